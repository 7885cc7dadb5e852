"""The job model: validation, normalisation, hashing and redaction of job definitions.

Plain functions and data, no Twisted: the API, the store and the supervisor all go
through :func:`validate` and :func:`load`, so a job means the same thing everywhere.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.x509 import load_pem_x509_certificates
from jsonpath_ng import JSONPath
from jsonpath_ng.ext import parse as _parse_jsonpath

from restconsumer.jobs.secrets import (
    REDACTED,
    hash_view,
    is_secret_header,
    origin_of,
    parse_reference,
    redact_secrets,
    reference_problems,
    slots,
)
from restconsumer.jobs.signing import SCHEMES, secret_problem

__all__ = [
    "ID_PATTERN",
    "METHODS",
    "REDACTED",
    "InvalidJob",
    "Job",
    "Policy",
    "Problem",
    "default_dead_letter_topic",
    "is_secret_header",
    "load",
    "redact",
    "url_placeholders",
    "validate",
]

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
BODY_METHODS = ("POST", "PUT", "PATCH")

#: Limits that keep compiling a job's JSONPaths (~20 ms each) short.
MAX_DATAMAP = 100
MAX_PATH = 1000

DEFAULT_RETRY = {"max_attempts": 8, "initial_wait": 1.0, "max_wait": 30.0}
DEFAULT_MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT = 10_000
ORDERINGS = ("partition", "key", "none")
DEFAULT_BATCH = {"max_messages": 100, "max_bytes": 1024 * 1024, "max_wait": 0.5,
                 "format": "json_array"}
BATCH_FORMATS = ("json_array", "ndjson")
START_FROM = ("earliest", "latest")
DEFAULT_TIMEOUT = 30.0

#: Definition fields, in the order they are shown.
FIELDS = (
    "id", "owner", "type", "topic", "datamap", "url", "basic_auth", "token",
    "token_type", "query_params", "json_body", "constant", "ratelimit", "headers",
    "retry", "timeout", "follow_redirects", "ca_cert", "dead_letter_topic",
    "ordering", "max_in_flight", "batch", "start_from", "success_status",
    "idempotency_key", "filter", "signing", "result_topic", "oauth2",
)
GENERATED = ("modified", "hash")
REQUIRED = ("id", "owner", "type", "topic", "datamap", "url")
#: Headers of the connection itself: set by the HTTP client, never by a job (a job setting
#: them could smuggle a second request, or reach another virtual host behind an allowed name).
CONNECTION_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                                "upgrade", "te", "trailer", "keep-alive"})
#: Fields naming topics the job writes to (``result_topic`` comes with SPEC §12).
OUTPUT_TOPICS = ("dead_letter_topic", "result_topic")


@dataclass(frozen=True)
class Policy:
    """What the service allows beyond a definition's own rules (SPEC §8).

    ``allow_hosts`` limits the URL's host; ``topic_limits`` maps an owner to the shell-style
    globs its jobs' topics must match (an owner not in it has no limit); ``files_allowed``
    says whether ``${file:NAME}`` references may be used (a ``--secrets-dir`` is set);
    ``secret_digest`` (an HMAC under ``--secret-key``) is what the hash sees of a secret.
    """

    allow_hosts: frozenset[str] | None = None
    topic_limits: Mapping[str, Sequence[str]] = field(default_factory=dict)
    files_allowed: bool = False
    secret_digest: Callable[[str], str] | None = None


@dataclass(frozen=True)
class Problem:
    """One reason a definition is refused: the field path and what is wrong there."""

    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The problem as JSON-ready data."""
        return {"field": self.field, "reason": self.reason}


class InvalidJob(ValueError):
    """A job definition broke the rules; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Job:
    """A validated job: its canonical definition, generated fields and compiled paths."""

    definition: dict[str, Any]
    modified: str
    hash: str
    paths: dict[str, JSONPath] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        """The job id."""
        return self.definition["id"]

    @property
    def owner(self) -> str:
        """Who owns the job."""
        return self.definition["owner"]

    @property
    def topics(self) -> list[str]:
        """The topics the job reads."""
        return self.definition["topic"]

    @property
    def dead_letter_topic(self) -> str:
        """Where messages that can never be delivered go."""
        return self.definition.get("dead_letter_topic") or default_dead_letter_topic(self.id)

    @property
    def retry(self) -> dict[str, float]:
        """The retry policy: defaults overridden by the job's own ``retry``."""
        return {**DEFAULT_RETRY, **self.definition.get("retry", {})}

    def stored(self) -> dict[str, Any]:
        """The job as kept in Redis: the definition plus ``modified`` and ``hash``."""
        return {**self.definition, "modified": self.modified, "hash": self.hash}

    def public(self) -> dict[str, Any]:
        """The job as the API shows it, secrets replaced by ``***``."""
        return redact(self.stored())


def default_dead_letter_topic(job_id: str) -> str:
    """The dead-letter topic of a job that names none."""
    return f"restconsumer.deadletter.{job_id}"


def redact(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored job with every secret replaced by ``***``.

    Secret references (``${env:…}``, ``${file:…}``) are shown as they are: they name a
    secret, they are not one. Credentials in the URL (refused since, but perhaps stored
    before) are masked too.
    """
    shown = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in stored.items()}
    redact_secrets(shown)
    url = shown.get("url")
    if isinstance(url, str) and "@" in url:
        shown["url"] = _mask_userinfo(url)
    return shown


def _mask_userinfo(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.netloc.rpartition('@')[2]}"))


def url_placeholders(template: str) -> list[str]:
    """The ``{key}`` names used by a URL template, in order."""
    return PLACEHOLDER.findall(template)


@lru_cache(maxsize=4096)
def parse_jsonpath(expression: str) -> JSONPath:
    """Compile a JSONPath (jsonpath-ng's extended syntax); cached, as compiling takes ~30 ms."""
    return _parse_jsonpath(expression)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _canonical_hash(definition: Mapping[str, Any],
                    digest: Callable[[str], str] | None = None) -> str:
    if digest is not None:
        # Under --secret-key, a secret enters the hash only as an HMAC under the key: a
        # plain SHA-256 over a weak password would let whoever reads the hash guess it.
        definition = hash_view(definition, digest)
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fold_keys(raw: Mapping[str, Any], known: Iterable[str], aliases: Mapping[str, str],
               where: str, problems: list[Problem]) -> dict[str, Any]:
    """Read ``raw``'s keys case-insensitively onto the ``known`` names."""
    known = tuple(known)
    folded: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(Problem(f"{where}{key}", "keys must be strings"))
            continue
        name = key.lower()
        name = aliases.get(name, name)
        if name not in known:
            problems.append(Problem(f"{where}{key}", "unknown field"))
        elif name in folded:
            problems.append(Problem(f"{where}{key}", f"given twice (as '{name}' in another case)"))
        else:
            folded[name] = value
    return folded


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_topic(value: Any, where: str, problems: list[Problem]) -> None:
    if not isinstance(value, str) or not TOPIC_PATTERN.match(value):
        problems.append(Problem(where, "must be a Kafka topic name: [A-Za-z0-9._-], 1 to 249 characters"))


def _check_headers(value: Any, datamap_keys: set[str] | None, problems: list[Problem]) -> None:
    if not isinstance(value, Mapping):
        problems.append(Problem("headers", "must be an object of name: value"))
        return
    for key, item in value.items():
        where = f"headers.{key}"
        if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", str(key)):
            problems.append(Problem(where, "is not a valid header name"))
        elif str(key).lower() in CONNECTION_HEADERS or str(key).lower().startswith("proxy-"):
            problems.append(Problem(where, "is a header of the connection, which the service "
                                           "sets itself; a job may not set it (nor any Proxy-* "
                                           "header)"))
        if not isinstance(item, str):
            problems.append(Problem(where, "must be a string"))
        elif "\n" in item or "\r" in item:
            problems.append(Problem(where, "must not contain line breaks"))
        elif not _latin1(item):
            problems.append(Problem(where, "must be Latin-1 text (HTTP header values are)"))
        elif is_secret_header(str(key)) or parse_reference(item) is not None:
            continue  # a credential is never a template
        else:
            for name in PLACEHOLDER.findall(item):
                if not name:
                    problems.append(Problem(where, "'{}' names no datamap key"))
                elif datamap_keys is not None and name not in datamap_keys:
                    problems.append(Problem(where, f"'{{{name}}}' is not a key of the datamap"))


def _check_url(url: Any, datamap_keys: set[str] | None, allow_hosts: frozenset[str] | None,
               problems: list[Problem]) -> None:
    if not isinstance(url, str) or not url:
        problems.append(Problem("url", "must be a non-empty string"))
        return
    names = url_placeholders(url)
    for name in names:
        if not name:
            problems.append(Problem("url", "'{}' names no datamap key"))
        elif datamap_keys is not None and name not in datamap_keys:
            problems.append(Problem("url", f"'{{{name}}}' is not a key of the datamap"))
    probe = PLACEHOLDER.sub("x", url)
    try:
        parts = urlsplit(probe)
        port = parts.port
    except ValueError as e:
        problems.append(Problem("url", f"is not a valid URL: {e}"))
        return
    if parts.scheme not in ("http", "https"):
        problems.append(Problem("url", "must start with http:// or https://"))
        return
    if not parts.hostname:
        problems.append(Problem("url", "has no host"))
        return
    del port
    if parts.username is not None or parts.password is not None:
        problems.append(Problem("url", "must not hold credentials (user:password@host): give "
                                       "them in basic_auth"))
    first = PLACEHOLDER.search(url)
    authority_end = len(f"{parts.scheme}://{parts.netloc}")
    if first is not None and first.start() < authority_end:
        problems.append(Problem("url", "placeholders may stand only in the path and query, "
                                       "never in the scheme, host or port"))
    if parts.fragment:
        problems.append(Problem("url", "must not have a #fragment"))
    if allow_hosts is not None and parts.hostname.lower() not in allow_hosts:
        problems.append(Problem("url", f"host '{parts.hostname}' is not in the allowed hosts"))


def _check_throughput(definition: dict[str, Any], datamap_keys: set[str] | None,
                      problems: list[Problem]) -> None:
    """``ordering``, ``max_in_flight`` and ``batch`` (SPEC §11)."""
    ordering = definition.get("ordering")
    if ordering is not None:
        if isinstance(ordering, Mapping):
            by = _fold_keys(ordering, ("by",), {}, "ordering.", problems).get("by")
            if not isinstance(by, str) or not by:
                problems.append(Problem("ordering.by", "must name a datamap key"))
            elif datamap_keys is not None and by not in datamap_keys:
                problems.append(Problem("ordering.by", f"'{by}' is not a key of the datamap"))
            else:
                definition["ordering"] = {"by": by}
        elif not isinstance(ordering, str) or ordering.lower() not in ORDERINGS:
            problems.append(Problem("ordering", "must be \"partition\", \"key\", \"none\" or "
                                                "{\"by\": datamap key}"))
        else:
            definition["ordering"] = ordering.lower()
    limit = definition.get("max_in_flight")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or not 1 <= limit <= MAX_IN_FLIGHT):
        problems.append(Problem("max_in_flight", f"must be a whole number from 1 to {MAX_IN_FLIGHT}"))
    batch = definition.get("batch")
    if batch is None:
        return
    if not isinstance(batch, Mapping):
        problems.append(Problem("batch", "must be an object {max_messages, max_bytes, max_wait, format}"))
        return
    batch = _fold_keys(batch, DEFAULT_BATCH, {}, "batch.", problems)
    count = batch.get("max_messages")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                              or not 1 <= count <= 10_000):
        problems.append(Problem("batch.max_messages", "must be a whole number from 1 to 10000"))
    size = batch.get("max_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 1024 <= size <= 64 * 1024 * 1024):
        problems.append(Problem("batch.max_bytes", "must be a whole number of bytes from 1024 to 64 MiB"))
    wait = batch.get("max_wait")
    if wait is not None:
        if not _number(wait) or not 0 <= wait <= 3600:
            problems.append(Problem("batch.max_wait", "must be a number of seconds from 0 to 3600"))
        else:
            batch["max_wait"] = float(wait)
    form = batch.get("format")
    if form is not None and form not in BATCH_FORMATS:
        problems.append(Problem("batch.format", f"must be one of {', '.join(BATCH_FORMATS)}"))
    definition["batch"] = batch
    if "json_body" not in definition:
        problems.append(Problem("json_body", "is required with batch: the body is the list of "
                                             "each record's json_body"))
    method = definition.get("type")
    if isinstance(method, str) and method.upper() not in BODY_METHODS:
        problems.append(Problem("batch", f"batches are sent only with {', '.join(BODY_METHODS)}"))
    url = definition.get("url")
    if isinstance(url, str) and url_placeholders(url):
        problems.append(Problem("url", "a batched job's URL holds no placeholders (one request "
                                       "carries many records)"))
    if definition.get("query_params"):
        problems.append(Problem("query_params", "a batched job's query holds no datamap values"))
    headers = definition.get("headers")
    if isinstance(headers, Mapping):
        for key, item in headers.items():
            if (isinstance(item, str) and PLACEHOLDER.search(item) and not is_secret_header(str(key))
                    and parse_reference(item) is None):
                problems.append(Problem(f"headers.{key}", "a batched job's headers hold no "
                                                          "placeholders (one request carries "
                                                          "many records)"))
    if ordering is not None and definition.get("ordering") != "partition":
        problems.append(Problem("ordering", "a batched job keeps partition order "
                                            "(batches of one partition go in order)"))


def _check_requests(definition: dict[str, Any], problems: list[Problem]) -> None:
    """``start_from`` and ``success_status`` (SPEC §12)."""
    start = definition.get("start_from")
    if start is not None:
        if not isinstance(start, str) or start.lower() not in START_FROM:
            problems.append(Problem("start_from", "must be \"earliest\" or \"latest\""))
        else:
            definition["start_from"] = start.lower()
    if "idempotency_key" in definition and not isinstance(definition["idempotency_key"], bool):
        problems.append(Problem("idempotency_key", "must be true or false"))
    codes = definition.get("success_status")
    if codes is not None:
        if not isinstance(codes, list):
            problems.append(Problem("success_status", "must be a list of HTTP status codes"))
            return
        for i, code in enumerate(codes):
            if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 599:
                problems.append(Problem(f"success_status[{i}]",
                                        "must be an HTTP status code from 100 to 599"))
            elif code in codes[:i]:
                problems.append(Problem(f"success_status[{i}]", f"{code} is given twice"))


def _check_signing(definition: dict[str, Any], problems: list[Problem]) -> None:
    """``signing`` (SPEC §12): a Standard Webhooks secret, ``whsec_<base64>``."""
    signing = definition.get("signing")
    if signing is None:
        return
    if not isinstance(signing, Mapping):
        problems.append(Problem("signing", "must be an object {secret, scheme}"))
        return
    signing = _fold_keys(signing, ("secret", "scheme"), {}, "signing.", problems)
    scheme = signing.setdefault("scheme", SCHEMES[0])
    if scheme not in SCHEMES:
        problems.append(Problem("signing.scheme", f"must be one of {', '.join(SCHEMES)}"))
    secret = signing.get("secret")
    if not isinstance(secret, str):
        problems.append(Problem("signing.secret", "is required: whsec_<base64>"))
    elif secret and secret != REDACTED and parse_reference(secret) is None:
        reason = secret_problem(secret)
        if reason is not None:
            problems.append(Problem("signing.secret", reason))
    definition["signing"] = signing


def _check_oauth2(definition: dict[str, Any], allow_hosts: frozenset[str] | None,
                  problems: list[Problem]) -> None:
    """``oauth2`` (SPEC §12): the client-credentials grant."""
    oauth = definition.get("oauth2")
    if oauth is None:
        return
    if not isinstance(oauth, Mapping):
        problems.append(Problem("oauth2", "must be an object {token_url, client_id, client_secret, "
                                          "scope?, audience?}"))
        return
    oauth = _fold_keys(oauth, ("token_url", "client_id", "client_secret", "scope", "audience"),
                       {}, "oauth2.", problems)
    oauth = {k: v for k, v in oauth.items() if v is not None}
    for name in ("token_url", "client_id", "client_secret"):
        if not isinstance(oauth.get(name), str):
            problems.append(Problem(f"oauth2.{name}", "is required and must be a string"))
    for name in ("scope", "audience"):
        if name in oauth and (not isinstance(oauth[name], str) or not oauth[name]):
            problems.append(Problem(f"oauth2.{name}", "must be a non-empty string"))
    url = oauth.get("token_url")
    if isinstance(url, str):
        inner: list[Problem] = []
        _check_url(url, set(), allow_hosts, inner)
        problems.extend(Problem("oauth2.token_url", p.reason) for p in inner)
    for other in ("basic_auth", "token"):
        if other in definition:
            problems.append(Problem("oauth2", f"a job takes oauth2 or {other}, not both"))
    headers = definition.get("headers")
    if isinstance(headers, Mapping) and any(str(k).lower() == "authorization" for k in headers):
        problems.append(Problem("oauth2", "sets the Authorization header: a job with oauth2 may "
                                          "not set it in headers"))
    definition["oauth2"] = oauth


def _check_ca_cert(value: Any, problems: list[Problem]) -> None:
    if not isinstance(value, str) or "BEGIN CERTIFICATE" not in value:
        problems.append(Problem("ca_cert", "must be PEM text with at least one certificate"))
        return
    try:
        load_pem_x509_certificates(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        problems.append(Problem("ca_cert", f"is not a valid PEM certificate: {e}"))


def _check_key_list(value: Any, name: str, datamap_keys: set[str] | None,
                    problems: list[Problem]) -> None:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        problems.append(Problem(name, "must be a list of datamap keys"))
        return
    for i, key in enumerate(value):
        if datamap_keys is not None and key not in datamap_keys:
            problems.append(Problem(f"{name}[{i}]", f"'{key}' is not a key of the datamap"))


def _origin(url: Any) -> tuple[str, str, int | None] | None:
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(PLACEHOLDER.sub("x", url))
        return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


def _restore_secrets(folded: dict[str, Any], previous: Mapping[str, Any] | None) -> None:
    """Keep a stored secret where the client sent back the ``***`` it was shown.

    Only while the field the secret is sent to (``url``; ``oauth2.token_url`` for the OAuth2
    client secret) keeps its scheme, host and port: a stored secret is never sent on to a
    destination it was not given for.
    """
    if not previous:
        return
    old = {s.path.lower(): s for s in slots(previous)}
    for slot in slots(folded):
        before = old.get(slot.path.lower())
        if slot.value != REDACTED or before is None:
            continue
        where = _origin(origin_of(folded, slot.origin))
        if where is not None and where == _origin(origin_of(previous, slot.origin)):
            slot.container[slot.key] = before.value


def _refuse_hidden(folded: Mapping[str, Any], problems: list[Problem]) -> None:
    """A ``***`` that could not be restored is the mask, not a secret: ask for the real one."""
    for slot in slots(folded):
        if slot.value == REDACTED:
            problems.append(Problem(slot.path, f"is *** (a hidden value): send the secret "
                                               f"itself (*** keeps the stored one only while "
                                               f"{slot.origin} keeps its scheme, host and port)"))


def _check_topics_allowed(definition: Mapping[str, Any], limits: Mapping[str, Sequence[str]],
                          problems: list[Problem]) -> None:
    """An owner's topic limits (its tokens' globs), and no output topic that is also a source."""
    topics = definition.get("topic")
    sources = [t for t in topics if isinstance(t, str)] if isinstance(topics, list) else []
    jid = definition.get("id")
    default_dlt = default_dead_letter_topic(jid) if isinstance(jid, str) else None
    for name in OUTPUT_TOPICS:
        out = definition.get(name)
        if isinstance(out, str) and out in sources:
            problems.append(Problem(name, f"'{out}' is also a source topic of the job: its "
                                          f"messages would come back to it"))
    if default_dlt is not None and "dead_letter_topic" not in definition and default_dlt in sources:
        problems.append(Problem("topic", f"'{default_dlt}' is the job's own dead-letter topic"))
    owner = definition.get("owner")
    globs = limits.get(owner) if isinstance(owner, str) else None
    if globs is None:
        return
    allowed = ", ".join(globs)

    def outside(topic: str) -> bool:
        return not any(fnmatch.fnmatchcase(topic, g) for g in globs)

    for i, topic in enumerate(sources):
        if outside(topic):
            problems.append(Problem(f"topic[{i}]", f"'{topic}' is not among the topics owner "
                                                   f"'{owner}' may use ({allowed})"))
    for name in OUTPUT_TOPICS:
        out = definition.get(name)
        if isinstance(out, str) and out != default_dlt and outside(out):
            problems.append(Problem(name, f"'{out}' is not among the topics owner '{owner}' "
                                          f"may use ({allowed})"))


def validate(raw: Any, job_id: str | None = None, *, previous: Mapping[str, Any] | None = None,
             allow_hosts: frozenset[str] | None = None, policy: Policy | None = None,
             modified: str | None = None) -> Job:
    """Check a job definition and return the :class:`Job` it describes.

    ``job_id`` is the id the definition must carry (the ``{id}`` of the route);
    ``previous`` is the stored job it replaces, whose secrets are kept where the
    definition holds ``***``; ``policy`` is what the service allows besides (its
    ``allow_hosts`` may also be given alone). Raises :class:`InvalidJob` listing every
    problem; ``modified`` defaults to now.
    """
    if policy is None:
        policy = Policy(allow_hosts=allow_hosts)
    elif allow_hosts is not None:
        policy = Policy(allow_hosts, policy.topic_limits, policy.files_allowed, policy.secret_digest)
    allow_hosts = policy.allow_hosts
    problems: list[Problem] = []
    if not isinstance(raw, Mapping):
        raise InvalidJob([Problem("", "a job must be a JSON object")])
    folded = _fold_keys(raw, FIELDS + GENERATED, {}, "", problems)
    for generated in GENERATED:
        folded.pop(generated, None)
    # Copies, so that restoring secrets never changes the caller's objects.
    folded = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in folded.items()}
    _restore_secrets(folded, previous)
    _refuse_hidden(folded, problems)

    for name in REQUIRED:
        if folded.get(name) is None:
            problems.append(Problem(name, "is required"))
    # An explicit null for an optional field means "not set".
    definition = {k: v for k, v in folded.items() if v is not None}

    jid = definition.get("id")
    if jid is not None:
        if not isinstance(jid, str) or not ID_PATTERN.match(jid):
            problems.append(Problem("id", "must match [A-Za-z0-9._-]{1,128}"))
        elif job_id is not None and jid != job_id:
            problems.append(Problem("id", f"'{jid}' differs from the id in the path, '{job_id}'"))

    owner = definition.get("owner")
    if owner is not None and (not isinstance(owner, str) or not ID_PATTERN.match(owner)):
        problems.append(Problem("owner", "must match [A-Za-z0-9._-]{1,128}"))

    method = definition.get("type")
    if method is not None:
        if isinstance(method, str) and method.upper() in METHODS:
            definition["type"] = method = method.upper()
        else:
            problems.append(Problem("type", f"must be one of {', '.join(METHODS)}"))
            method = None

    topics = definition.get("topic")
    if topics is not None:
        if isinstance(topics, str):
            definition["topic"] = topics = [topics]
        if not isinstance(topics, list) or not topics:
            problems.append(Problem("topic", "must be a topic name or a non-empty list of them"))
        else:
            for i, topic in enumerate(topics):
                _check_topic(topic, f"topic[{i}]", problems)
            if len(set(map(str, topics))) != len(topics):
                problems.append(Problem("topic", "names a topic twice"))

    paths: dict[str, JSONPath] = {}
    datamap = definition.get("datamap")
    datamap_keys: set[str] | None = None
    if datamap is not None:
        if not isinstance(datamap, Mapping):
            problems.append(Problem("datamap", "must be an object of key: JSONPath"))
        else:
            datamap_keys = set(datamap)
            if len(datamap) > MAX_DATAMAP:
                problems.append(Problem("datamap", f"has {len(datamap)} keys; at most {MAX_DATAMAP}"))
                datamap = {}
            for key, expr in datamap.items():
                where = f"datamap.{key}"
                if not key or "{" in key or "}" in key:
                    problems.append(Problem(where, "keys must be non-empty and have no braces"))
                if not isinstance(expr, str) or not expr.strip():
                    problems.append(Problem(where, "must be a JSONPath string"))
                    continue
                if len(expr) > MAX_PATH:
                    problems.append(Problem(where, f"is longer than {MAX_PATH} characters"))
                    continue
                try:
                    paths[key] = parse_jsonpath(expr)
                except Exception as e:  # jsonpath-ng raises several unrelated types
                    problems.append(Problem(where, f"is not a valid JSONPath: {e}"))

    if "url" in definition:
        _check_url(definition["url"], datamap_keys, allow_hosts, problems)

    flt = definition.get("filter")
    if flt is not None:
        if not isinstance(flt, str) or not flt.strip():
            problems.append(Problem("filter", "must be a JSONPath filter, e.g. "
                                              "$[?(@.msg.status == 'approved')]"))
        elif len(flt) > MAX_PATH:
            problems.append(Problem("filter", f"is longer than {MAX_PATH} characters"))
        else:
            try:
                parse_jsonpath(flt)
            except Exception as e:  # jsonpath-ng raises several unrelated types
                problems.append(Problem("filter", f"is not a valid JSONPath: {e}"))

    auth = definition.get("basic_auth")
    if auth is not None:
        if not isinstance(auth, Mapping):
            problems.append(Problem("basic_auth", "must be an object {user, pw}"))
        else:
            auth = _fold_keys(auth, ("user", "pw"), {"password": "pw", "username": "user"},
                              "basic_auth.", problems)
            for key in ("user", "pw"):
                if not isinstance(auth.get(key), str):
                    problems.append(Problem(f"basic_auth.{key}", "is required and must be a string"))
            definition["basic_auth"] = auth

    for name in ("token", "token_type"):
        if name in definition and (not isinstance(definition[name], str) or not definition[name]):
            problems.append(Problem(name, "must be a non-empty string"))
    if "token_type" in definition and "token" not in definition:
        problems.append(Problem("token_type", "has no token to go with"))
    if "token" in definition and "basic_auth" in definition:
        problems.append(Problem("token", "a job takes basic_auth or token, not both"))

    if "query_params" in definition:
        _check_key_list(definition["query_params"], "query_params", datamap_keys, problems)
    if "json_body" in definition:
        _check_key_list(definition["json_body"], "json_body", datamap_keys, problems)
        if method is not None and method not in BODY_METHODS:
            problems.append(Problem("json_body", f"is sent only with {', '.join(BODY_METHODS)}"))

    if "constant" in definition and not isinstance(definition["constant"], Mapping):
        problems.append(Problem("constant", "must be an object"))

    for name in ("ratelimit", "timeout"):
        value = definition.get(name)
        if value is not None and (not _number(value) or value < 0 or value > 86400):
            problems.append(Problem(name, "must be a number of seconds from 0 to 86400"))
        elif value is not None:
            definition[name] = float(value)
    if definition.get("timeout") == 0:
        problems.append(Problem("timeout", "must be more than 0 seconds"))

    if "follow_redirects" in definition and not isinstance(definition["follow_redirects"], bool):
        problems.append(Problem("follow_redirects", "must be true or false"))

    if "ca_cert" in definition:
        _check_ca_cert(definition["ca_cert"], problems)

    if "headers" in definition:
        _check_headers(definition["headers"], datamap_keys, problems)

    retry = definition.get("retry")
    if retry is not None:
        if not isinstance(retry, Mapping):
            problems.append(Problem("retry", "must be an object {max_attempts, initial_wait, max_wait}"))
        else:
            retry = _fold_keys(retry, DEFAULT_RETRY, {}, "retry.", problems)
            attempts = retry.get("max_attempts")
            if attempts is not None and (not isinstance(attempts, int) or isinstance(attempts, bool)
                                         or attempts < 0):
                problems.append(Problem("retry.max_attempts",
                                        "must be a whole number, 0 for retrying until it succeeds"))
            for name in ("initial_wait", "max_wait"):
                value = retry.get(name)
                if value is not None and (not _number(value) or value <= 0 or value > 86400):
                    problems.append(Problem(f"retry.{name}", "must be a number of seconds above 0"))
                elif value is not None:
                    retry[name] = float(value)
            merged = {**DEFAULT_RETRY, **retry}
            if (_number(merged["initial_wait"]) and _number(merged["max_wait"])
                    and merged["max_wait"] < merged["initial_wait"]):
                problems.append(Problem("retry.max_wait", "must not be less than initial_wait"))
            definition["retry"] = retry

    if "dead_letter_topic" in definition:
        _check_topic(definition["dead_letter_topic"], "dead_letter_topic", problems)
    if "result_topic" in definition:
        _check_topic(definition["result_topic"], "result_topic", problems)

    _check_throughput(definition, datamap_keys, problems)
    _check_requests(definition, problems)
    _check_signing(definition, problems)
    _check_oauth2(definition, allow_hosts, problems)
    _check_topics_allowed(definition, policy.topic_limits, problems)
    for path, reason in reference_problems(definition, policy.files_allowed):
        problems.append(Problem(path, reason))
    for slot in slots(definition):
        if slot.value == "" and slot.path != "token":  # token has its own rule
            problems.append(Problem(slot.path, "is empty: an empty secret is never sent"))

    if problems:
        raise InvalidJob(problems)

    definition = {name: definition[name] for name in FIELDS if name in definition}
    digest = _canonical_hash(definition, policy.secret_digest)
    if modified is None:
        kept = previous.get("modified") if previous is not None and previous.get("hash") == digest \
            else None
        modified = kept if isinstance(kept, str) and kept else _now()
    return Job(definition=definition, modified=modified, hash=digest, paths=paths)


def load(stored: Mapping[str, Any], policy: Policy | None = None) -> Job:
    """The :class:`Job` of a definition read back from the store, keeping its ``modified``.

    With a ``policy``, the definition is checked against it again (topic limits, secret
    references), as it is when a job starts.
    """
    modified = stored.get("modified") if isinstance(stored, Mapping) else None
    return validate(stored, policy=policy, modified=modified if isinstance(modified, str) else None)
