"""Job secrets (SPEC §8): where they are in a definition, references to them, encryption at rest.

Plain functions and data, no Twisted. A *secret* is the value of one of the fields listed in
:data:`SECRET_FIELDS` or of a credential-like header (:func:`is_secret_header`). It may be

- a literal, which is shown as ``***``, stored encrypted under ``--secret-key`` when one is
  set, and enters the job's hash only through an HMAC under that key;
- a reference, ``${env:RESTCONSUMER_SECRET_…}`` or ``${file:NAME}``, which is stored and
  shown as it is and resolved by each instance when the job starts (:func:`resolve`).

Encrypted values are stored as ``{"fernet": token, "key": fingerprint}``: a definition
field that holds a secret is otherwise a string, so such an object cannot be mistaken for
one a client sent (the model refuses objects there).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = [
    "ENV_PREFIX",
    "FINGERPRINT_KEY",
    "KEY_FILE_VARIABLE",
    "MAX_SECRET_FILE",
    "REDACTED",
    "SECRET_FIELDS",
    "KeyVerdict",
    "Reference",
    "SecretKey",
    "Slot",
    "UnreadableSecret",
    "UnresolvedSecrets",
    "check_key",
    "hash_view",
    "is_secret_header",
    "iter_secret_literals",
    "needs_sealing",
    "open_definition",
    "origin_of",
    "parse_reference",
    "redact_secrets",
    "reference_problems",
    "resolve",
    "seal_definition",
    "sealed_fingerprints",
    "sealed_paths",
    "slots",
]

REDACTED = "***"
#: Only environment variables with this prefix may be referenced.
ENV_PREFIX = "RESTCONSUMER_SECRET_"
#: The variable naming the key file: it has the prefix, but is the service's own setting.
KEY_FILE_VARIABLE = "RESTCONSUMER_SECRET_KEY_FILE"
#: The largest secret file read, in bytes.
MAX_SECRET_FILE = 64 * 1024
#: The Redis key holding the fingerprint of the key that encrypts the stored secrets.
FINGERPRINT_KEY = "restconsumer:secret_key"

#: Secret fields besides the headers: (object, field) or (field,), with the field whose
#: origin (scheme, host, port) the secret is sent to. ``oauth2`` and ``signing`` come with
#: SPEC §12; they are covered here already, so that adding them to the model is enough.
SECRET_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("basic_auth", "pw"), "url"),
    (("token",), "url"),
    (("oauth2", "client_secret"), "oauth2.token_url"),
    (("signing", "secret"), "url"),
)
#: Header values are sent to the job's URL.
HEADERS_ORIGIN = "url"
#: Other spellings of secret fields, read case-insensitively.
_ALIASES = {"password": "pw"}

_SECRET_HEADER = re.compile(r"authorization|cookie|key|token|secret|passw", re.I)
_REFERENCE = re.compile(r"^\$\{(env|file):([^{}]*)\}$")
_ENV_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SEALED = "fernet"


def is_secret_header(name: str) -> bool:
    """Whether a header's value is a credential that must never be shown."""
    return bool(_SECRET_HEADER.search(name))


# -- where the secrets are --------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One secret in a definition: ``container[key]``, shown as ``path``, sent to ``origin``."""

    path: str
    container: dict[str, Any]
    key: str
    origin: str

    @property
    def value(self) -> Any:
        """The value in the slot."""
        return self.container[self.key]


def _key_of(container: Mapping[str, Any], wanted: str) -> str | None:
    for key in container:
        if isinstance(key, str) and _ALIASES.get(key.lower(), key.lower()) == wanted:
            return key
    return None


def slots(definition: Mapping[str, Any]) -> list[Slot]:
    """Every secret present in ``definition`` (nested field names read case-insensitively).

    The containers are those of ``definition`` itself: assigning through a slot changes it.
    """
    found: list[Slot] = []
    for path, origin in SECRET_FIELDS:
        container: Any = definition
        for part in path[:-1]:
            container = container.get(part) if isinstance(container, Mapping) else None
        if not isinstance(container, dict):
            continue
        key = _key_of(container, path[-1]) if len(path) > 1 else (
            path[-1] if path[-1] in container else None)
        if key is not None and container[key] is not None:
            found.append(Slot(".".join(path), container, key, origin))
    headers = definition.get("headers")
    if isinstance(headers, dict):
        for name in headers:
            if isinstance(name, str) and is_secret_header(name):
                found.append(Slot(f"headers.{name}", headers, name, HEADERS_ORIGIN))
    return found


def _field(definition: Mapping[str, Any], dotted: str) -> Any:
    value: Any = definition
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        key = _key_of(value, part)
        value = value.get(key) if key is not None else None
    return value


def origin_of(definition: Mapping[str, Any], dotted: str) -> Any:
    """The value of the field a secret is sent to (``url``, ``oauth2.token_url``)."""
    return _field(definition, dotted)


def redact_secrets(definition: dict[str, Any]) -> None:
    """Replace every secret literal of ``definition`` (in place) by ``***``; references stay."""
    for slot in slots(definition):
        if not (isinstance(slot.value, str) and parse_reference(slot.value) is not None):
            slot.container[slot.key] = REDACTED


# -- references -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """``${env:NAME}`` or ``${file:NAME}``."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"${{{self.kind}:{self.name}}}"

    def refusal(self, files_allowed: bool) -> str | None:
        """Why this reference may not be used (None: it may), never naming a secret."""
        if self.kind == "env":
            if not self.name.startswith(ENV_PREFIX) or not _ENV_NAME.match(self.name) \
                    or self.name == ENV_PREFIX:
                return (f"{self}: only environment variables whose name starts with {ENV_PREFIX} "
                        f"(letters, digits, _) may be referenced")
            if self.name == KEY_FILE_VARIABLE:
                return f"{self}: {KEY_FILE_VARIABLE} is the service's own setting, not a secret"
            return None
        if not _FILE_NAME.match(self.name) or ".." in self.name:
            return (f"{self}: only a file directly inside --secrets-dir may be referenced, by its "
                    f"bare name (letters, digits, '.', '_', '-'; no '/', not starting with '.')")
        if not files_allowed:
            return f"{self}: this service has no --secrets-dir, so no file can be referenced"
        return None


def parse_reference(value: Any) -> Reference | None:
    """The reference ``value`` is, or None if it is no ``${env:…}``/``${file:…}``."""
    if not isinstance(value, str):
        return None
    match = _REFERENCE.match(value)
    return Reference(match.group(1), match.group(2)) if match else None


def _looks_like_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


def _mentions_reference(value: Any) -> bool:
    return isinstance(value, str) and ("${env:" in value or "${file:" in value)


def reference_problems(definition: Mapping[str, Any], files_allowed: bool) -> list[tuple[str, str]]:
    """Every misused reference of a (normalised) definition, as (field path, reason)."""
    problems: list[tuple[str, str]] = []
    secret_paths = set()
    for slot in slots(definition):
        secret_paths.add(slot.path)
        if not _looks_like_reference(slot.value):
            if _mentions_reference(slot.value):
                problems.append((slot.path, "a secret reference must be the whole value: "
                                            "\"${env:NAME}\" or \"${file:NAME}\""))
            continue
        reference = parse_reference(slot.value)
        if reference is None:
            problems.append((slot.path, "is not a secret reference: write "
                                        f"${{env:{ENV_PREFIX}NAME}} or ${{file:NAME}}"))
            continue
        refusal = reference.refusal(files_allowed)
        if refusal is not None:
            problems.append((slot.path, refusal))
    elsewhere: list[tuple[str, Any]] = []
    headers = definition.get("headers")
    if isinstance(headers, Mapping):
        elsewhere += [(f"headers.{k}", v) for k, v in headers.items()]
    auth = definition.get("basic_auth")
    if isinstance(auth, Mapping):
        elsewhere += [(f"basic_auth.{k}", v) for k, v in auth.items()]
    elsewhere += [(name, definition.get(name)) for name in ("url", "token_type")]
    for path, value in elsewhere:
        if path not in secret_paths and _mentions_reference(value):
            problems.append((path, "only a secret field may hold a secret reference "
                                   "(basic_auth.pw, token, or a credential-like header such as "
                                   "Authorization or X-Api-Key)"))
    return problems


class UnresolvedSecrets(Exception):
    """References that could not be resolved; ``problems`` lists (field path, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))
        self.problems = problems


def _read_secret_file(reference: Reference, secrets_dir: str | Path | None) -> str:
    if secrets_dir is None:
        raise ValueError(f"{reference} needs --secrets-dir, which this instance was not given")
    folder = Path(secrets_dir)
    try:
        real_folder = folder.resolve(strict=True)
        real = (folder / reference.name).resolve(strict=True)
    except FileNotFoundError:
        raise ValueError(f"{reference}: no such file in the secrets folder") from None
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{reference}: cannot be opened ({type(e).__name__})") from None
    # A link (as Kubernetes mounts secrets) may lead within the folder, never out of it.
    if not real.is_relative_to(real_folder):
        raise ValueError(f"{reference} leads outside the secrets folder")
    if not real.is_file():
        raise ValueError(f"{reference} is not a regular file")
    try:
        with real.open("rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise ValueError(f"{reference} cannot be read: {e.strerror or type(e).__name__}") from None
    if len(data) > MAX_SECRET_FILE:
        raise ValueError(f"{reference} is larger than {MAX_SECRET_FILE // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{reference} is not UTF-8 text") from None
    # Files written by editors and `echo` end with a line break that is no part of the secret.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _resolve_one(reference: Reference, environ: Mapping[str, str],
                 secrets_dir: str | Path | None) -> str:
    refusal = reference.refusal(secrets_dir is not None)
    if refusal is not None:
        raise ValueError(refusal)
    if reference.kind == "env":
        value = environ.get(reference.name)
        if value is None:
            raise ValueError(f"{reference}: the variable is not set on this instance")
    else:
        value = _read_secret_file(reference, secrets_dir)
    if value == "":
        raise ValueError(f"{reference} is empty (an empty secret is never sent)")
    if _CONTROL.search(value):
        raise ValueError(f"{reference} holds a line break or another control character, "
                         f"which cannot go into a request")
    return value


def resolve(definition: Mapping[str, Any], environ: Mapping[str, str],
            secrets_dir: str | Path | None) -> dict[str, Any]:
    """A copy of ``definition`` with every secret reference replaced by its value.

    Raises :class:`UnresolvedSecrets` listing every reference that cannot be resolved
    (the reasons name the reference, never a value). A header's value must be Latin-1.
    """
    resolved = copy.deepcopy(dict(definition))
    problems: list[tuple[str, str]] = []
    for slot in slots(resolved):
        reference = parse_reference(slot.value)
        if reference is None:
            continue
        try:
            value = _resolve_one(reference, environ, secrets_dir)
            if slot.path.startswith("headers."):
                value.encode("latin-1")
        except UnicodeEncodeError:
            problems.append((slot.path, f"{reference} is not Latin-1 text (a header value is)"))
            continue
        except ValueError as e:
            problems.append((slot.path, str(e)))
            continue
        slot.container[slot.key] = value
    if problems:
        raise UnresolvedSecrets(problems)
    return resolved


# -- the hash ---------------------------------------------------------------------------


def hash_view(definition: Mapping[str, Any], digest: Callable[[str], str]) -> dict[str, Any]:
    """A copy of ``definition`` for hashing: each secret literal replaced by its ``digest``.

    References stay as they are: they are names, not secrets.
    """
    view = copy.deepcopy(dict(definition))
    for slot in slots(view):
        if isinstance(slot.value, str) and parse_reference(slot.value) is None:
            slot.container[slot.key] = {"hmac-sha256": digest(slot.value)}
    return view


# -- encryption at rest ---------------------------------------------------------------


class UnreadableSecret(ValueError):
    """An encrypted secret that none of the keys opens."""


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(b"restconsumer secret key fingerprint\0" + raw).hexdigest()[:16]


class SecretKey:
    """The Fernet keys of ``--secret-key``: the first encrypts, any of them decrypts."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("no key")
        raws = [base64.urlsafe_b64decode(k) for k in keys]
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        #: The fingerprint of each key, the writing key's first.
        self.fingerprints = [_fingerprint(r) for r in raws]
        self._hash_key = hmac.new(raws[0], b"restconsumer job hash", hashlib.sha256).digest()

    @classmethod
    def parse(cls, text: str, where: str = "the key file") -> SecretKey:
        """Keys one per line (blank lines and ``#`` comments skipped); ValueError if bad."""
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                raw = base64.urlsafe_b64decode(line.encode("ascii"))
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"{where}, line {number}: not a Fernet key (32 bytes in url-safe "
                                 f"base64, as Fernet.generate_key() makes)")
            keys.append(line.encode("ascii"))
        if not keys:
            raise ValueError(f"{where} holds no key")
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> SecretKey:
        """The keys of a key file; ValueError saying why it cannot be used."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ValueError(f"cannot read the key file {path}: {reason}") from None
        return cls.parse(text, f"the key file {path}")

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the key that encrypts."""
        return self.fingerprints[0]

    def seal(self, value: str) -> dict[str, str]:
        """``value`` encrypted under the first key."""
        token = self._fernet.encrypt(value.encode("utf-8")).decode("ascii")
        return {_SEALED: token, "key": self.fingerprint}

    def open(self, sealed: Mapping[str, Any]) -> str:
        """The value of an encrypted secret; :class:`UnreadableSecret` if no key opens it."""
        try:
            return self._fernet.decrypt(str(sealed[_SEALED]).encode("ascii")).decode("utf-8")
        except (InvalidToken, KeyError, UnicodeError, ValueError):
            fingerprint = sealed.get("key") if isinstance(sealed, Mapping) else None
            raise UnreadableSecret(f"encrypted under the key with fingerprint {fingerprint}, "
                                   f"which --secret-key does not hold") from None

    def digest(self, value: str) -> str:
        """An HMAC-SHA256 of a secret under (a key derived from) the writing key."""
        return hmac.new(self._hash_key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def _is_sealed(value: Any) -> bool:
    return isinstance(value, Mapping) and _SEALED in value


def seal_definition(stored: Mapping[str, Any], key: SecretKey) -> dict[str, Any]:
    """A copy of a stored job with every secret literal encrypted under ``key``'s first key.

    Secrets already encrypted under another of its keys are encrypted again (rotation).
    """
    sealed = copy.deepcopy(dict(stored))
    for slot in slots(sealed):
        value = slot.value
        if _is_sealed(value) and value.get("key") != key.fingerprint:
            value = key.open(value)
        if isinstance(value, str) and parse_reference(value) is None:
            slot.container[slot.key] = key.seal(value)
    return sealed


def open_definition(stored: Mapping[str, Any],
                    key: SecretKey | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A copy of a stored job with its secrets decrypted, and the (path, reason) of any left
    encrypted because no key opens them."""
    opened = copy.deepcopy(dict(stored))
    unreadable: list[tuple[str, str]] = []
    for slot in slots(opened):
        if not _is_sealed(slot.value):
            continue
        if key is None:
            unreadable.append((slot.path, f"encrypted under the key with fingerprint "
                                          f"{slot.value.get('key')}, and no --secret-key is set"))
            continue
        try:
            slot.container[slot.key] = key.open(slot.value)
        except UnreadableSecret as e:
            unreadable.append((slot.path, str(e)))
    return opened, unreadable


def sealed_paths(stored: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (field path, key fingerprint) of every secret of a job still encrypted."""
    return [(s.path, str(s.value.get("key"))) for s in slots(stored) if _is_sealed(s.value)]


def sealed_fingerprints(stored: Mapping[str, Any]) -> set[str]:
    """The fingerprints of the keys a stored job's secrets are encrypted under."""
    return {str(s.value.get("key")) for s in slots(stored) if _is_sealed(s.value)}


def needs_sealing(stored: Mapping[str, Any], key: SecretKey) -> bool:
    """Whether a stored job holds a secret in clear, or one under a key other than the first."""
    for slot in slots(stored):
        value = slot.value
        if _is_sealed(value):
            if value.get("key") != key.fingerprint:
                return True
        elif isinstance(value, str) and parse_reference(value) is None:
            return True
    return False


def iter_secret_literals(stored: Mapping[str, Any]) -> Iterator[str]:
    """Every secret of a job kept in clear (not a reference, not encrypted)."""
    for slot in slots(stored):
        if isinstance(slot.value, str) and parse_reference(slot.value) is None:
            yield slot.value


# -- the key check at start-up ----------------------------------------------------------


@dataclass(frozen=True)
class KeyVerdict:
    """What an instance does with the key fingerprint in Redis.

    ``error``: it refuses to start, saying why; else ``store`` is the fingerprint to write
    (None: leave it), and ``reseal`` says whether jobs must be encrypted (again).
    """

    error: str | None = None
    store: str | None = None
    reseal: bool = False


def check_key(stored: str | None, found: set[str], plain_jobs: int,
              key: SecretKey | None) -> KeyVerdict:
    """Decide on start-up: ``stored`` is the fingerprint kept in Redis, ``found`` those of the
    keys the stored jobs are encrypted under, ``plain_jobs`` how many hold secrets in clear."""
    if key is None:
        if stored is not None or found:
            which = ", ".join(sorted({stored} | found if stored else found))
            return KeyVerdict(error=f"Redis holds job secrets encrypted under the key with "
                                    f"fingerprint {which}, and no --secret-key is set: start "
                                    f"with --secret-key FILE (RESTCONSUMER_SECRET_KEY_FILE) "
                                    f"holding that key")
        return KeyVerdict()
    ours = set(key.fingerprints)
    if stored is not None and stored not in ours:
        return KeyVerdict(error=f"the job secrets in Redis are encrypted under the key with "
                                f"fingerprint {stored}, which --secret-key does not hold (it "
                                f"holds {', '.join(key.fingerprints)}): start with the key "
                                f"that the other instances use, the new one first for rotation")
    unknown = found - ours
    if unknown:
        return KeyVerdict(error=f"jobs in Redis hold secrets encrypted under the key with "
                                f"fingerprint {', '.join(sorted(unknown))}, which --secret-key "
                                f"does not hold (it holds {', '.join(key.fingerprints)})")
    reseal = plain_jobs > 0 or bool(found - {key.fingerprint})
    return KeyVerdict(store=key.fingerprint if stored != key.fingerprint else None, reseal=reseal)
