"""The job model: validation, normalisation, hashing and redaction of job definitions.

Plain functions and data, no Twisted: the API, the store and the supervisor all go
through :func:`validate` and :func:`load`, so a job means the same thing everywhere.

A definition is first normalised (keys read case-insensitively, ``password`` read as
``pw``, nulls left out, ``post`` read as ``POST``), then checked against its schema,
``JobDefinition`` in the API's ``openapi.json`` (:mod:`restconsumer.jobs.schema`): which
fields there are, and their types, enums, ranges and patterns, are said there only. What
a schema cannot say is checked here: the rules between fields (placeholders name datamap
keys, a body only with POST, PUT or PATCH, one kind of credentials...), what must be
parsed (URLs, JSONPaths, certificates, signing secrets), and the service's policy
(allowed hosts, an owner's topics, which secrets may be read).
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jsonpath_ng import JSONPath
from jsonpath_ng.ext import parse as _parse_jsonpath

from restconsumer.base.pem import read_certificates
from restconsumer.base.urls import origin
from restconsumer.jobs import schema
from restconsumer.jobs.destinations import Destinations, refusal
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

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
BODY_METHODS = ("POST", "PUT", "PATCH")

DEFAULT_RETRY = {"max_attempts": 8, "initial_wait": 1.0, "max_wait": 30.0, "max_throttled": 3600.0}
#: A job without ``max_in_flight`` finds its concurrency itself (SPEC §11), up to this.
DEFAULT_MAX_IN_FLIGHT_LIMIT = 512
DEFAULT_BATCH = {"max_messages": 100, "max_bytes": 1024 * 1024, "max_wait": 0.5,
                 "format": "json_array"}
DEFAULT_TIMEOUT = 30.0

#: Definition fields, in the order they are shown (each one described by the schema).
FIELDS = (
    "id", "owner", "type", "topic", "datamap", "url", "basic_auth", "token",
    "token_type", "query_params", "json_body", "constant", "ratelimit", "headers",
    "retry", "timeout", "follow_redirects", "ca_cert", "dead_letter_topic",
    "ordering", "max_in_flight", "max_in_flight_limit", "batch", "start_from", "success_status",
    "idempotency_key", "filter", "signing", "result_topic", "oauth2",
)
GENERATED = ("modified", "hash")
#: Other names read for a field of these objects (after folding the case).
ALIASES = {"basic_auth": {"password": "pw", "username": "user"}}
#: Values read case-insensitively, and the case they are kept in.
VALUE_CASE: dict[str, Callable[[str], str]] = {"type": str.upper, "start_from": str.lower,
                                                "ordering": str.lower}
#: Seconds, kept as floats (the hash sees 5 and 5.0 alike).
SECONDS = ("ratelimit", "timeout", "retry.initial_wait", "retry.max_wait", "retry.max_throttled",
           "batch.max_wait")
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
    ``secret_digest`` (an HMAC under ``--secret-key``) is what the hash sees of a secret;
    ``destinations`` says what each owner of the tokens file may reach (SPEC §8).
    """

    allow_hosts: frozenset[str] | None = None
    topic_limits: Mapping[str, Sequence[str]] = field(default_factory=dict)
    files_allowed: bool = False
    secret_digest: Callable[[str], str] | None = None
    #: owner → what its jobs may reach besides public addresses (every owner of the tokens
    #: file); a literal address it may not reach is refused at validation
    destinations: Mapping[str, Destinations] = field(default_factory=dict)


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


# -- normalising ---------------------------------------------------------------------------


def _normalise(raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """``raw`` read the way the schema is checked against: a copy, its keys folded.

    Keys are read case-insensitively onto the schema's names (an unknown one is kept as it
    was given, for the schema to name it), an explicit null for a field means it is not set,
    ``topic`` may be one name, and some values are read case-insensitively too.
    """
    shape = schema.shape()
    definition = _fold(raw, shape.schema, "", problems, GENERATED)
    for generated in GENERATED:
        definition.pop(generated, None)
    for name, case in VALUE_CASE.items():
        if isinstance(definition.get(name), str):
            definition[name] = case(definition[name])
    if isinstance(definition.get("topic"), str):
        definition["topic"] = [definition["topic"]]
    return definition


def _fold(raw: Mapping[Any, Any], node: Mapping[str, Any], where: str, problems: list[Problem],
          extra: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``raw``'s keys case-insensitively onto the field names of schema ``node``.

    Objects of named fields (``retry``, ``basic_auth``...) are folded in turn; the values of
    other objects (``datamap``, ``headers``) are copied, keys as they are, so that restoring
    secrets never changes the caller's objects.
    """
    known = node["properties"]
    aliases = ALIASES.get(where, {})
    objects = schema.shape().objects if not where else {}
    folded: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{where}.{key}" if where else f"{key}"
        if not isinstance(key, str):
            problems.append(Problem(at, "keys must be strings"))
            continue
        name = aliases.get(key.lower(), key.lower())
        if name not in known and name not in extra:
            folded[key] = value
        elif name in folded:
            problems.append(Problem(at, f"given twice (as '{name}' in another case)"))
        else:
            if name in objects and isinstance(value, Mapping):
                value = _fold(value, objects[name], name, problems)
            elif isinstance(value, Mapping):
                value = dict(value)
            folded[name] = value
    return {k: v for k, v in folded.items() if v is not None or k not in known}


# -- the rules between fields ----------------------------------------------------------------


def _check_url(url: Any, datamap_keys: set[str] | None, allow_hosts: frozenset[str] | None,
               problems: list[Problem], granted: Destinations | None = None) -> None:
    if not isinstance(url, str) or not url:
        return  # the schema's to say
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
    if granted is not None:
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a name: checked on the addresses it resolves to, when sent
        reason = refusal(parts.hostname, address, granted)
        if reason is not None:
            problems.append(Problem("url", reason))


def _check_datamap(datamap: Any, unsound: frozenset[str], problems: list[Problem]) -> dict[str, JSONPath]:
    """Compile the datamap's JSONPaths; none when the schema found too many (compiling is slow)."""
    paths: dict[str, JSONPath] = {}
    if not isinstance(datamap, Mapping) or "datamap" in unsound:
        return paths
    for key, expr in datamap.items():
        where = f"datamap.{key}"
        if where in unsound:
            continue
        if not expr.strip():
            problems.append(Problem(where, "must be a JSONPath string"))
            continue
        try:
            paths[key] = parse_jsonpath(expr)
        except Exception as e:  # jsonpath-ng raises several unrelated types
            problems.append(Problem(where, f"is not a valid JSONPath: {e}"))
    return paths


def _check_filter(flt: str, problems: list[Problem]) -> None:
    if not flt.strip():
        problems.append(Problem("filter", "must be a JSONPath filter, e.g. "
                                          "$[?(@.msg.status == 'approved')]"))
        return
    try:
        parse_jsonpath(flt)
    except Exception as e:  # jsonpath-ng raises several unrelated types
        problems.append(Problem("filter", f"is not a valid JSONPath: {e}"))


def _check_headers(headers: Mapping[str, Any], datamap_keys: set[str] | None,
                   problems: list[Problem]) -> None:
    for key, item in headers.items():
        where = f"headers.{key}"
        if str(key).lower() in CONNECTION_HEADERS or str(key).lower().startswith("proxy-"):
            problems.append(Problem(where, "is a header of the connection, which the service "
                                           "sets itself; a job may not set it (nor any Proxy-* "
                                           "header)"))
        if not isinstance(item, str):
            continue  # the schema's to say
        if "\n" in item or "\r" in item:
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


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ca_cert(value: str, problems: list[Problem]) -> None:
    if "BEGIN CERTIFICATE" not in value:
        problems.append(Problem("ca_cert", "must be PEM text with at least one certificate"))
        return
    try:
        read_certificates(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        problems.append(Problem("ca_cert", f"is not a valid PEM certificate: {e}"))


def _check_key_list(value: list[str], name: str, datamap_keys: set[str] | None,
                    problems: list[Problem]) -> None:
    for i, key in enumerate(value):
        if datamap_keys is not None and key not in datamap_keys:
            problems.append(Problem(f"{name}[{i}]", f"'{key}' is not a key of the datamap"))


def _check_retry(retry: Any, problems: list[Problem]) -> None:
    if not isinstance(retry, Mapping):
        return
    merged = {**DEFAULT_RETRY, **retry}
    if (_number(merged["initial_wait"]) and _number(merged["max_wait"])
            and merged["max_wait"] < merged["initial_wait"]):
        problems.append(Problem("retry.max_wait", "must not be less than initial_wait"))


def _check_batch(definition: Mapping[str, Any], problems: list[Problem]) -> None:
    """What a batched job (SPEC §11) cannot have: one request carries many records."""
    if not isinstance(definition.get("batch"), Mapping):
        return
    if "json_body" not in definition:
        problems.append(Problem("json_body", "is required with batch: the body is the list of "
                                             "each record's json_body"))
    method = definition.get("type")
    if isinstance(method, str) and method not in BODY_METHODS:
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
    if "ordering" in definition and definition["ordering"] != "partition":
        problems.append(Problem("ordering", "a batched job keeps partition order "
                                            "(batches of one partition go in order)"))


def _check_signing(signing: Any, problems: list[Problem]) -> None:
    """``signing`` (SPEC §12): a Standard Webhooks secret, ``whsec_<base64>``."""
    secret = signing.get("secret") if isinstance(signing, Mapping) else None
    if isinstance(secret, str) and secret and secret != REDACTED and parse_reference(secret) is None:
        reason = secret_problem(secret)
        if reason is not None:
            problems.append(Problem("signing.secret", reason))


def _check_oauth2(definition: Mapping[str, Any], allow_hosts: frozenset[str] | None,
                  unsound: frozenset[str], problems: list[Problem],
                  granted: Destinations | None = None) -> None:
    """``oauth2`` (SPEC §12): the client-credentials grant, alone with its Authorization."""
    oauth = definition.get("oauth2")
    if not isinstance(oauth, Mapping):
        return
    if "token_url" in oauth and "oauth2.token_url" not in unsound:
        inner: list[Problem] = []
        _check_url(oauth["token_url"], set(), allow_hosts, inner, granted)
        problems.extend(Problem("oauth2.token_url", p.reason) for p in inner)
    for other in ("basic_auth", "token"):
        if other in definition:
            problems.append(Problem("oauth2", f"a job takes oauth2 or {other}, not both"))
    headers = definition.get("headers")
    if isinstance(headers, Mapping) and any(str(k).lower() == "authorization" for k in headers):
        problems.append(Problem("oauth2", "sets the Authorization header: a job with oauth2 may "
                                          "not set it in headers"))


def _origin(url: Any) -> tuple[str, str, int | None] | None:
    if not isinstance(url, str):
        return None
    try:
        return origin(PLACEHOLDER.sub("x", url))
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


def _check_rules(definition: dict[str, Any], job_id: str | None, policy: Policy,
                 unsound: frozenset[str], problems: list[Problem]) -> dict[str, JSONPath]:
    """What the schema cannot say; each rule reads only values the schema found sound."""

    def sound(name: str) -> bool:
        return name in definition and name not in unsound

    owner = definition.get("owner")
    granted = policy.destinations.get(owner) if isinstance(owner, str) else None
    jid = definition.get("id")
    if job_id is not None and sound("id") and jid != job_id:
        problems.append(Problem("id", f"'{jid}' differs from the id in the path, '{job_id}'"))
    datamap = definition.get("datamap")
    keys = set(datamap) if isinstance(datamap, Mapping) else None
    paths = _check_datamap(datamap, unsound, problems)
    if sound("url"):
        _check_url(definition["url"], keys, policy.allow_hosts, problems, granted)
    if sound("filter"):
        _check_filter(definition["filter"], problems)
    if "token_type" in definition and "token" not in definition:
        problems.append(Problem("token_type", "has no token to go with"))
    if "token" in definition and "basic_auth" in definition:
        problems.append(Problem("token", "a job takes basic_auth or token, not both"))
    for name in ("query_params", "json_body"):
        if sound(name):
            _check_key_list(definition[name], name, keys, problems)
    if "json_body" in definition and sound("type") and definition["type"] not in BODY_METHODS:
        problems.append(Problem("json_body", f"is sent only with {', '.join(BODY_METHODS)}"))
    if sound("ca_cert"):
        _check_ca_cert(definition["ca_cert"], problems)
    if isinstance(definition.get("headers"), Mapping):
        _check_headers(definition["headers"], keys, problems)
    _check_retry(definition.get("retry"), problems)
    ordering = definition.get("ordering")
    if isinstance(ordering, Mapping) and sound("ordering") and "ordering.by" not in unsound \
            and keys is not None and ordering["by"] not in keys:
        problems.append(Problem("ordering.by", f"'{ordering['by']}' is not a key of the datamap"))
    if "max_in_flight_limit" in definition and definition.get("max_in_flight", "auto") != "auto":
        problems.append(Problem("max_in_flight_limit", 'bounds max_in_flight "auto" only; this job sets '
                                                       "a number"))
    _check_batch(definition, problems)
    _check_signing(definition.get("signing"), problems)
    _check_oauth2(definition, policy.allow_hosts, unsound, problems, granted)
    _check_topics_allowed(definition, policy.topic_limits, problems)
    for path, reason in reference_problems(definition, policy.files_allowed):
        problems.append(Problem(path, reason))
    for slot in slots(definition):
        if slot.value == "" and slot.path != "token":  # token has its own rule
            problems.append(Problem(slot.path, "is empty: an empty secret is never sent"))
    return paths


def _canonical(definition: dict[str, Any]) -> dict[str, Any]:
    """A valid definition as it is kept: fields in order, seconds as floats, defaults named."""
    for name in SECONDS:
        outer, _, inner = name.rpartition(".")
        container = definition.get(outer) if outer else definition
        if isinstance(container, dict) and inner in container:
            container[inner] = float(container[inner])
    if "signing" in definition:
        definition["signing"].setdefault("scheme", SCHEMES[0])
    return {name: definition[name] for name in FIELDS if name in definition}


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
        policy = replace(policy, allow_hosts=allow_hosts)
    if not isinstance(raw, Mapping):
        raise InvalidJob([Problem("", "a job must be a JSON object")])
    problems: list[Problem] = []
    definition = _normalise(raw, problems)
    _restore_secrets(definition, previous)
    _refuse_hidden(definition, problems)
    report = schema.problems(definition)
    problems.extend(Problem(path, reason) for path, reason in report.problems)
    paths = _check_rules(definition, job_id, policy, report.unsound, problems)
    if problems:
        raise InvalidJob(problems)

    definition = _canonical(definition)
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
