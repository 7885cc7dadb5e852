"""What every layer shares: value types (:mod:`.types`), thread services
(:mod:`.threads`), ending the process with a status (:mod:`.process`)."""
