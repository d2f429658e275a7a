"""Generate the reference documents that must never drift from the code.

Owns: ``docs/configuration.md`` (from the ``Settings`` dataclasses: sections,
keys, types, defaults, environment variable names, and the comments written
next to each field in ``config.py``) and ``docs/admin-api.md`` (from the admin
app's OpenAPI document). ``tests/test_docs.py`` fails when a committed file
differs from what this module generates, or when a setting has no description.
Must not import: ``acme``, ``hypercorn``.

Run ``make docs`` (``python -m edgeproxy.devtools.refdocs``) after changing a
setting or an admin route; ``--check`` only compares and exits 1 on drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import tempfile
import tokenize
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_type_hints

from .. import config
from ..control.admin import create_admin_app
from ..config import AdminSettings, EventEndpointSettings, RouteSettings, Settings
from ..control.registry import Registry
from ..storage import open_storage
from ..control.tokens import TokenStore
from ..control.webhooks import EventLog

__all__ = [
    "EXTRA_DOCS",
    "admin_api_markdown",
    "configuration_markdown",
    "field_docs",
    "generated_files",
    "main",
    "openapi_document",
]

# Where the comment next to a field in config.py is missing or too terse for an
# operator, this text is used instead.
EXTRA_DOCS: dict[str, str] = {
    "acme.directory": '"production" and "staging" are shortcuts for Let\'s Encrypt.',
    "acme.email": "Contact address for the ACME account (optional).",
    "listen.http": "HTTP-01 answers, and a redirect to https for registered hosts with a certificate.",
    "listen.https": "TLS for every registered hostname, certificate chosen by SNI.",
    "listen.admin": "The admin API. Keep it on loopback: it must never share the public sockets.",
    "storage.url": ("`sqlite://<absolute path>` (one node), or a libpq URI `postgresql://user@host/db` "
                    "shared by several nodes (README: several nodes on one PostgreSQL store)."),
    "storage.auto_migrate": ("PostgreSQL: create or upgrade the schema on start. `false`: a node refuses an "
                             "outdated schema until `edgeproxy migrate` has run."),
    "storage.lock_ttl": ("Seconds of the lease one node holds on a name's ACME order, renewed every third "
                         "of it while the order runs: a crashed node's lease is taken over after this."),
    "upstream.script": "The vendor's tracker script, fetched and cached in memory.",
    "upstream.relay": "The vendor's queue relay; POSTs under `routes.api_path` are forwarded here.",
    "upstream.connect_timeout": "Seconds to connect to the script origin or the relay.",
    "upstream.timeout": "Seconds for a whole request to the script origin or the relay.",
    "routes.script_path": ("Where the rewritten script is served. Keep it free of words filter lists match "
                           "(analytics, stats, track, collect, event...): `edgeproxy doctor` warns."),
    "routes.api_path": "POST here (and below) is forwarded to `upstream.relay` + the rest of the path.",
    "dns.cname_target": ("What customers CNAME to; names inside this zone are refused as customer domains. "
                         "Use a neutral name on a domain of your own, never under the vendor's domain."),
    "dns.edge_ips": "A/AAAA alternatives offered to customers who cannot CNAME (zone apex).",
    "domains.extra_suffixes": 'Suffixes admitted beyond the public suffix list, e.g. ["test"] for tests.',
    "domains.deny": 'Names refused with everything below them, e.g. ["bank.example"].',
    "domains.max_domains": "Most domains this edge serves; registrations beyond it get 403 (0 = no limit).",
    "domains.registrations_per_hour": "Registrations accepted per hour; beyond it 429 with Retry-After (0 = no limit).",
    "admin.token_file": ("Bootstrap bearer token for the admin API; created (0600, random) on first start if "
                         "missing. May be deleted once named tokens exist."),
    "admin.tokens_file": "Named tokens (`edgeproxy tokens create NAME`), stored as SHA-256 hashes only.",
    "proxy.max_body": "API request bodies larger than this many bytes get 413.",
    "proxy.rate_per_ip": ("API requests per second per visitor IP, answered 429 locally beyond it (never "
                          "forwarded, never spooled); per worker process; 0 = off."),
    "proxy.rate_per_domain": ("API requests per second per custom domain, answered 429 locally beyond it; "
                              "per worker process; 0 = off."),
}


def _comments(cls: type[Any]) -> dict[str, str]:
    """Field name -> the comment on its line, or in the comment block just above it."""
    source = inspect.getsource(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or line.lstrip().startswith("#"):
            continue
        text = comments.get(number, "")
        above: list[str] = []
        previous = number - 1
        while previous in comments and lines[previous - 1].lstrip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        out[name] = " ".join([*above, text]).strip()
    return out


def field_docs() -> dict[str, dict[str, str]]:
    """section -> key -> description (EXTRA_DOCS, else the comment in config.py)."""
    docs: dict[str, dict[str, str]] = {}
    for section, cls in get_type_hints(Settings).items():
        comments = _comments(cls)
        docs[section] = {}
        for f in dataclasses.fields(cls):
            text = EXTRA_DOCS.get(f"{section}.{f.name}") or comments.get(f.name, "")
            docs[section][f.name] = text[:1].upper() + text[1:]
    return docs


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {value!r}")


# Arrays of tables ([[section.key]]): documented in a subsection of their own.
_TABLE_ARRAYS: dict[str, type[Any]] = {"tuple[RouteSettings, ...]": RouteSettings,
                                       "tuple[EventEndpointSettings, ...]": EventEndpointSettings}


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    if text in _TABLE_ARRAYS:
        return "array of tables"
    return {"tuple[str, ...]": "list of strings", "Mapping[str, str]": "table of strings"}.get(text, text)


def _table_array_markdown(section: str, key: str, cls: type[Any]) -> list[str]:
    comments = _comments(cls)
    out = [f"### [[{section}.{key}]]", "", (cls.__doc__ or "").strip(),
           f"Set the whole array in the environment as JSON: `EDGEPROXY_{section.upper()}_{key.upper()}=[{{"
           + ", ".join(f'"{f.name}": ...' for f in dataclasses.fields(cls)[:3]) + "}]`.", "",
           "| key | type | default | description |", "| --- | --- | --- | --- |"]
    defaults = cls()
    for f in dataclasses.fields(cls):
        text = comments.get(f.name, "")
        default = _toml(getattr(defaults, f.name)).replace("|", "\\|")
        out.append(f"| `{f.name}` | {_type_name(f.type)} | `{default}` | "
                   f"{(text[:1].upper() + text[1:]).replace('|', chr(92) + '|')} |")
    out.append("")
    return out


def configuration_markdown() -> str:
    defaults = Settings()
    docs = field_docs()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `make docs` (python -m edgeproxy.devtools.refdocs) from edgeproxy/config.py."
        " Do not edit: tests/test_docs.py fails when this file is stale. -->",
        "",
        "edgeproxy reads one TOML file (`edgeproxy --config FILE`, or the file named by",
        "`$EDGEPROXY_CONFIG`). Every key can be overridden by an environment variable",
        "`EDGEPROXY_<SECTION>_<KEY>`, which wins over the file. In the environment, lists are",
        'JSON (`["a","b"]`) or comma-separated, tables are JSON, booleans are',
        "`1/0/true/false/yes/no/on/off`. Unknown sections and keys are errors. With no file",
        "at all, the defaults below are used. `edgeproxy doctor` checks a configuration.",
        "",
    ]
    for section, cls in get_type_hints(Settings).items():
        out += [f"## [{section}]", "", "| key | type | default | environment variable | description |",
                "| --- | --- | --- | --- | --- |"]
        values = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            env = f"EDGEPROXY_{section.upper()}_{f.name.upper()}"
            default = _toml(getattr(values, f.name)).replace("|", "\\|")
            description = docs[section][f.name].replace("|", "\\|")
            out.append(f"| `{f.name}` | {_type_name(f.type)} | `{default}` | `{env}` | {description} |")
        out.append("")
        for f in dataclasses.fields(cls):
            if str(f.type) in _TABLE_ARRAYS:
                out += _table_array_markdown(section, f.name, _TABLE_ARRAYS[str(f.type)])
    out += ["## Every default, as a file", "", "```toml"]
    for section, cls in get_type_hints(Settings).items():
        out.append(f"[{section}]")
        values = getattr(defaults, section)
        out += [f"{f.name} = {_toml(getattr(values, f.name))}" for f in dataclasses.fields(cls)]
        out.append("")
    out[-1] = "```"
    out.append("")
    return "\n".join(out)


def openapi_document() -> dict[str, Any]:
    """The admin app's OpenAPI document (the app is built over a throwaway store)."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(f"sqlite://{tmp}/refdocs.db")
        try:
            admin = AdminSettings(token_file=f"{tmp}/token", tokens_file=f"{tmp}/tokens.json")
            # The optional routes too (/metrics), as `serve` mounts them.
            app = create_admin_app(Registry(storage, Settings()), TokenStore(admin, create_bootstrap=True),
                                   last_check=lambda _host: None, metrics=lambda: (b"", "text/plain"),
                                   event_log=EventLog(storage))
            document: dict[str, Any] = app.openapi()
        finally:
            storage.close()
    return document


def _schema_type(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_schema_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_schema_type(schema.get('items', {}))}"
    if schema.get("type") == "object":
        return "object"
    return str(schema.get("type", "any"))


def admin_api_markdown(document: Mapping[str, Any] | None = None) -> str:
    doc = openapi_document() if document is None else document
    out = [
        "# Admin API reference",
        "",
        "<!-- Generated by `make docs` (python -m edgeproxy.devtools.refdocs) from the admin app's"
        " OpenAPI document. Do not edit: tests/test_docs.py fails when this file is stale. -->",
        "",
        f"{doc['info']['title']}, version {doc['info']['version']}: {doc['info'].get('description', '')}",
        "",
        "Served on `listen.admin` only (loopback by default). Routes marked *token* need",
        "`Authorization: Bearer <token>` with the content of `admin.token_file`; a missing or",
        "wrong token is 401. Errors have the shape `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`;",
        "a malformed request body is 400 `bad_request`. A running server also serves this",
        "document as JSON at `GET /openapi.json`.",
        "",
        "| method | path | auth | summary |",
        "| --- | --- | --- | --- |",
    ]
    operations: list[tuple[str, str, Mapping[str, Any]]] = [
        (method.upper(), path, op) for path, item in doc["paths"].items() for method, op in item.items()
    ]
    for method, path, op in operations:
        auth = "token" if op.get("security") else "none"
        out.append(f"| {method} | `{path}` | {auth} | {op.get('summary', '')} |")
    out.append("")
    for method, path, op in operations:
        out += [f"## {method} `{path}`", "", op.get("summary", ""), ""]
        inputs = [f"- {param['in']} parameter `{param['name']}`: {_schema_type(param.get('schema', {}))}"
                  for param in op.get("parameters", [])]
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if body:
            inputs.append(f"- request body (JSON): {_schema_type(body)}")
        if inputs:
            out += [*inputs, ""]
        out += ["| status | meaning | body |", "| --- | --- | --- |"]
        for status, response in sorted(op.get("responses", {}).items()):
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            out.append(f"| {status} | {response.get('description', '')} | {_schema_type(schema) if schema else '-'} |")
        out.append("")
    out += ["## Schemas", ""]
    for name, schema in sorted(doc.get("components", {}).get("schemas", {}).items()):
        out += [f"### {name}", "", "| field | type | required | description |", "| --- | --- | --- | --- |"]
        required = set(schema.get("required", []))
        for field_name, prop in schema.get("properties", {}).items():
            description = str(prop.get("description", "")).replace("|", "\\|")
            out.append(f"| `{field_name}` | {_schema_type(prop)} | {'yes' if field_name in required else 'no'} "
                       f"| {description} |")
        out.append("")
    return "\n".join(out)


def generated_files(root: Path) -> dict[Path, str]:
    return {root / "docs" / "configuration.md": configuration_markdown(),
            root / "docs" / "admin-api.md": admin_api_markdown()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeproxy.devtools.refdocs", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(config.__file__).resolve().parent.parent,
                        help="repository root (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated_files(args.root).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("stale (run `make docs`): " + ", ".join(str(p) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
