"""The delivery core: how a fetched Kafka message becomes delivered records and a commit.

A message's way, in the order it goes (each step one module, each module one rule):

1. **Fetch.** The job's Kafka loop (:mod:`restconsumer.kafka.consumer`) polls on the job's own
   thread and, still there, decodes and maps each message into its requests
   (:func:`restconsumer.jobs.work.prepare`); a batch of prepared messages crosses to the reactor.

2. **Intake** (:mod:`.intake`). Each message is entered in the partition's
   :mod:`.ledger` (which knows what may be committed: never past an unfinished message),
   held by the job's outcomes with its bytes charged to the process's :mod:`.budget`, and
   its records handed to dispatch. A message whose schema the Schema Registry has not
   given yet waits here, with every batch after it. Intake also decides what the Kafka loop
   fetches: partitions pause over the budget, past their window, or while the job is held.

3. **Dispatch** (:mod:`.dispatch`). Records queue by order group in the :mod:`.ordering`
   scheduler — or gather into one batch per partition (:mod:`.batching`) — and start as
   the order, ``max_in_flight`` and the circuit allow.

4. **Attempt** (:mod:`.deliverer`, :mod:`.attempt`). A started unit — one record, one
   undecodable message, one batch — is sent with the job's token and signature at the
   job's pace, judged and retried by the :mod:`.retry` policy, until each of its records
   ends; whatever a step raises dead-letters the records it left open.

5. **Circuit** (:mod:`.breaker` over :mod:`.circuit`). When the endpoint looks down rather
   than a record bad, the circuit opens: nothing new starts, records that would retry park,
   and the oldest probes until one succeeds — a probe is always armed or under way.

6. **Outcome** (:mod:`.outcomes`). A record ends delivered, dead-lettered or filtered; a
   dead letter or a result is produced without holding up the partition, only the
   message's offset waits for Kafka's acknowledgement. A finished message leaves the
   ledger and the budget, and the commit point moves.

7. **Commit.** The Kafka loop commits what the ledger says is due; a revocation lets the
   requests on the wire end within a grace, cancels the rest, and commits what finished.

:mod:`.runner` wires these parts for one job and keeps its lifecycle; :mod:`.settings` is
the job's definition as the core reads it, swapped whole on a change; :mod:`.replay` sends
dead letters again through the same attempt and outcome code as the running job.
"""
