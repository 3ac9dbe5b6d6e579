"""Who is calling and what they may do: API keys (stored as hashes), OIDC bearer tokens, roles.

One file (TOML, or YAML when PyYAML is installed) configures it, given by ``hybridlm serve --auth FILE``::

    [[keys]]                      # API keys: only their SHA-256 is stored (see new_api_key)
    principal = "alice"
    role = "admin"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"   # hybridlm apikey

    [roles.analyst]               # optional: roles beyond (or replacing) the built-in admin/user/auditor
    endpoints = ["models", "completions", "chat"]
    models = ["llama-tiny"]       # "*" for every model

    [oidc]                        # optional: single sign-on with bearer JWTs from an OIDC provider
    issuer = "https://sso.example.com/realms/main"
    audience = "hybridlm"
    jwks_file = "jwks.json"       # the provider's public keys, saved locally (path relative to this file)
    algorithms = ["RS256", "ES256"]
    roles_claim = "groups"        # a string or list claim; each value is looked up in role_map
    principal_claim = "sub"
    [oidc.role_map]
    "llm-admins" = "admin"
    "llm-users" = "user"

    [audit]                       # optional: where the audit log goes (else --audit-log)
    path = "audit.jsonl"
    max_bytes = 10000000
    backups = 5

Endpoints a role can be granted: ``models`` (GET /v1/models), ``completions``, ``chat``, ``audit``
(GET /v1/audit), ``metrics``; ``*`` grants all. ``/health`` needs no credential. Built-in roles: ``admin``
(everything), ``user`` (models, completions, chat on every model), ``auditor`` (audit and metrics).

A missing or invalid credential is a 401; a valid one whose roles lack the endpoint or model is a 403.
API keys are compared by hash, so the file holds nothing that lets anyone call the server; keys should be
random (``new_api_key`` makes 256-bit ones), which is why a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridlm.serve.protocol import forbidden, unauthorized

ENDPOINTS = ("models", "completions", "chat", "audit", "metrics", "openapi")


@dataclass(frozen=True)
class Role:
    name: str
    endpoints: frozenset[str]
    models: frozenset[str]

    def allows(self, endpoint: str, model: str | None = None) -> bool:
        if "*" not in self.endpoints and endpoint not in self.endpoints:
            return False
        return model is None or "*" in self.models or model in self.models


BUILTIN_ROLES = {
    "admin": Role("admin", frozenset({"*"}), frozenset({"*"})),
    "user": Role("user", frozenset({"models", "completions", "chat"}), frozenset({"*"})),
    "auditor": Role("auditor", frozenset({"audit", "metrics"}), frozenset()),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` for the audit log, ``roles`` for permissions, ``method`` how."""

    name: str
    roles: tuple[Role, ...]
    method: str  # "api_key" | "oidc" | "none"

    @property
    def role(self) -> str:
        return ",".join(r.name for r in self.roles) or "-"

    def allows(self, endpoint: str, model: str | None = None) -> bool:
        return any(r.allows(endpoint, model) for r in self.roles)

    def require(self, endpoint: str, model: str | None = None) -> None:
        """403 unless one of the roles grants ``endpoint`` (on ``model``)."""
        if not self.roles:
            raise forbidden(f"{self.name}: no role is assigned to this identity")
        if not self.allows(endpoint):
            raise forbidden(f"role {self.role} may not use the {endpoint} endpoint")
        if model is not None and not self.allows(endpoint, model):
            raise forbidden(f"role {self.role} may not use model {model!r}")


LOCAL_ADMIN = Principal("local", (BUILTIN_ROLES["admin"],), "none")


@dataclass
class OidcConfig:
    issuer: str
    audience: str
    keys: dict[str | None, Any]  # kid -> PyJWK
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256"])
    roles_claim: str = "roles"
    principal_claim: str = "sub"
    role_map: dict[str, str] = field(default_factory=dict)
    leeway: float = 0.0


@dataclass
class AuthConfig:
    """The parsed ``--auth`` file."""

    roles: dict[str, Role]
    keys: dict[str, tuple[str, str]]  # sha256 hex -> (principal, role name)
    oidc: OidcConfig | None = None
    audit: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> AuthConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--auth {path}: file not found")
        data = _read(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a table at the top level")
        unknown = set(data) - {"keys", "roles", "oidc", "audit"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected keys, roles, oidc, audit")
        roles = dict(BUILTIN_ROLES)
        for name, spec in (data.get("roles") or {}).items():
            roles[name] = _role(path, name, spec)
        keys = {}
        for i, spec in enumerate(data.get("keys") or []):
            where = f"{path}: keys[{i}]"
            if not isinstance(spec, dict) or not {"principal", "role", "sha256"} <= set(spec):
                raise ValueError(f"{where}: expected principal, role and sha256, got {spec!r}")
            digest = str(spec["sha256"]).lower().removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where}.sha256: expected 64 hex digits (the SHA-256 of the key), got "
                                 f"{spec['sha256']!r}")
            if spec["role"] not in roles:
                raise ValueError(f"{where}.role: expected one of {sorted(roles)}, got {spec['role']!r}")
            keys[digest] = (str(spec["principal"]), spec["role"])
        oidc = _oidc(path, data["oidc"], roles) if "oidc" in data else None
        audit = dict(data.get("audit") or {})
        if "path" in audit:
            audit["path"] = str((path.parent / audit["path"]).resolve())
        return cls(roles, keys, oidc, audit)


def _read(path: Path) -> Any:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write TOML") from None
        return yaml.safe_load(text)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None


def _role(path: Path, name: str, spec: Any) -> Role:
    if not isinstance(spec, dict) or not isinstance(spec.get("endpoints"), list):
        raise ValueError(f"{path}: roles.{name}: expected endpoints = [...] and models = [...], got {spec!r}")
    bad = [e for e in spec["endpoints"] if e != "*" and e not in ENDPOINTS]
    if bad:
        raise ValueError(f"{path}: roles.{name}.endpoints: unknown {bad}; expected some of {list(ENDPOINTS)} or '*'")
    models = spec.get("models", ["*"])
    if not isinstance(models, list):
        raise ValueError(f"{path}: roles.{name}.models: expected a list of model names or ['*'], got {models!r}")
    return Role(name, frozenset(spec["endpoints"]), frozenset(map(str, models)))


def _oidc(path: Path, spec: Any, roles: dict[str, Role]) -> OidcConfig:
    from jwt import PyJWK

    where = f"{path}: oidc"
    missing = {"issuer", "audience", "jwks_file"} - set(spec or {})
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}")
    algorithms = list(spec.get("algorithms", ["RS256", "ES256"]))
    bad = [a for a in algorithms if a not in ("RS256", "ES256")]
    if bad:
        raise ValueError(f"{where}.algorithms: expected RS256 and/or ES256, got {bad}")
    jwks_path = path.parent / spec["jwks_file"]
    if not jwks_path.is_file():
        raise FileNotFoundError(f"{where}.jwks_file: {jwks_path} not found")
    jwks = json.loads(jwks_path.read_text())
    keys = {}
    for i, jwk in enumerate(jwks.get("keys", []) if isinstance(jwks, dict) else []):
        if isinstance(jwk, dict) and jwk.get("use") == "enc":
            continue  # an encryption key (providers such as Keycloak publish them too): never verifies tokens
        try:
            keys[jwk.get("kid")] = PyJWK(jwk)
        except Exception as e:  # noqa: BLE001 - name the bad key
            raise ValueError(f"{jwks_path}: keys[{i}]: not a usable RS256/ES256 public key ({e})") from None
    if not keys:
        raise ValueError(f"{jwks_path}: expected a JWKS object {{\"keys\": [...]}} with at least one key")
    role_map = dict(spec.get("role_map") or {})
    for claim_value, role in role_map.items():
        if role not in roles:
            raise ValueError(f"{where}.role_map[{claim_value!r}]: expected one of {sorted(roles)}, got {role!r}")
    return OidcConfig(issuer=spec["issuer"], audience=spec["audience"], keys=keys, algorithms=algorithms,
                      roles_claim=spec.get("roles_claim", "roles"),
                      principal_claim=spec.get("principal_claim", "sub"), role_map=role_map,
                      leeway=float(spec.get("leeway_seconds", 0)))


class Authenticator:
    """Turns an ``Authorization`` header into a ``Principal`` or a 401."""

    def __init__(self, config: AuthConfig | None) -> None:
        self.config = config

    def authenticate(self, authorization: str | None) -> Principal:
        if self.config is None:  # no --auth: loopback only (the server checks), everyone is the local admin
            return LOCAL_ADMIN
        if not authorization:
            raise unauthorized("missing credential: send 'Authorization: Bearer <API key or token>'")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise unauthorized("malformed Authorization header: expected 'Bearer <API key or token>'")
        if credential.count(".") == 2 and self.config.oidc is not None:
            return self._verify_jwt(credential)
        found = self.config.keys.get(hashlib.sha256(credential.encode()).hexdigest())
        if found is None:
            raise unauthorized("invalid API key")
        name, role = found
        return Principal(name, (self.config.roles[role],), "api_key")

    def _verify_jwt(self, token: str) -> Principal:
        import jwt

        oidc = self.config.oidc
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in oidc.algorithms:  # "none" and HS* (key confusion) never get here
                raise unauthorized(f"token algorithm {alg!r} not accepted; expected one of {oidc.algorithms}")
            key = oidc.keys.get(header.get("kid"))
            if key is None and header.get("kid") is None and len(oidc.keys) == 1:
                key = next(iter(oidc.keys.values()))
            if key is None:
                raise unauthorized("token signed by an unknown key (kid not in the configured JWKS)")
            if key.algorithm_name != alg:  # e.g. an RS256 header naming an EC key: never verify across types
                raise unauthorized(f"token algorithm {alg!r} does not match its key's {key.algorithm_name!r}")
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=oidc.audience, issuer=oidc.issuer,
                                leeway=oidc.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("token audience does not match this server") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("token issuer does not match the configured issuer") from None
        except (jwt.InvalidTokenError, jwt.PyJWKError, TypeError, ValueError) as e:  # a bad token is never a 500
            raise unauthorized(f"invalid token: {e}") from None
        name = claims.get(oidc.principal_claim)
        if not isinstance(name, str) or not name:
            raise unauthorized(f"token has no {oidc.principal_claim!r} claim naming the caller")
        values = claims.get(oidc.roles_claim, [])
        values = [values] if isinstance(values, str) else values if isinstance(values, list) else []
        role_names = sorted({oidc.role_map[v] for v in values if isinstance(v, str) and v in oidc.role_map})
        return Principal(name, tuple(self.config.roles[r] for r in role_names), "oidc")


def new_api_key() -> tuple[str, str]:
    """A random API key and the SHA-256 hex to put in the auth file (the key itself goes to the client)."""
    key = "sk-" + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()
