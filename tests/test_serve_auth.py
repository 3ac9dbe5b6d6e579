"""Auth: API keys (hashes) and roles x endpoints, OIDC JWTs (RS256/ES256) against a local JWKS, the audit log
(every request, refused ones included, no secret), loopback-only without --auth."""

import hashlib
import json
import time
from datetime import datetime, timezone

import pytest

pytest.importorskip("fastapi")
jwt = pytest.importorskip("jwt")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from jwt.algorithms import ECAlgorithm, RSAAlgorithm  # noqa: E402
from serve_helpers import tiny_model  # noqa: E402

from hybridlm.cli import main  # noqa: E402
from hybridlm.serve import AuditLog, AuthConfig, Limits, create_app, new_api_key  # noqa: E402
from hybridlm.serve.app import BackgroundServer, bind  # noqa: E402
from hybridlm.serve.audit import query  # noqa: E402

ISSUER, AUDIENCE = "https://sso.test.example", "hybridlm-test"
KEYS = {role: new_api_key() for role in ("admin", "user", "auditor", "restricted")}


@pytest.fixture(scope="module")
def signing_keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "rogue": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory, signing_keys):
    d = tmp_path_factory.mktemp("auth")
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(signing_keys["rsa"].public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(signing_keys["ec"].public_key()))
    rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
    ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
    (d / "jwks.json").write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    keys = "\n".join(f'[[keys]]\nprincipal = "{role}-key"\nrole = "{role}"\nsha256 = "{digest}"\n'
                     for role, (_, digest) in KEYS.items())
    (d / "auth.toml").write_text(f"""
{keys}
[roles.restricted]
endpoints = ["models", "completions"]
models = ["mamba-tiny"]

[oidc]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "jwks.json"
roles_claim = "groups"
principal_claim = "email"
[oidc.role_map]
"llm-users" = "user"
"llm-auditors" = "auditor"

[audit]
path = "audit.jsonl"
""")
    return d / "auth.toml"


@pytest.fixture(scope="module")
def server(auth_file):
    auth = AuthConfig.load(auth_file)
    audit = AuditLog(auth.audit["path"])
    models = {"llama-tiny": tiny_model("llama-tiny"), "mamba-tiny": tiny_model("mamba-tiny")}
    app = create_app(models, auth=auth, audit_log=audit, limits=Limits(max_context=512, max_tokens=16))
    with BackgroundServer(app) as srv:
        srv.audit, srv.sent, srv.secrets = audit, [0], [key for key, _ in KEYS.values()]
        yield srv


def call(server, endpoint: str, credential: str | None, model: str = "llama-tiny") -> httpx.Response:
    headers = {} if credential is None else {"Authorization": f"Bearer {credential}"}
    if endpoint != "health":
        server.sent[0] += 1
        if credential:
            server.secrets.append(credential)
    gen = {"model": model, "max_tokens": 2}
    requests = {
        "models": ("GET", "/v1/models", None),
        "completions": ("POST", "/v1/completions", {**gen, "prompt": "hello"}),
        "chat": ("POST", "/v1/chat/completions", {**gen, "messages": [{"role": "user", "content": "hi"}]}),
        "audit": ("GET", "/v1/audit", None),
        "metrics": ("GET", "/metrics", None),
        "health": ("GET", "/health", None),
        "model": ("GET", f"/v1/models/{model}", None),
    }
    method, path, body = requests[endpoint]
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)


ENDPOINTS = ["models", "completions", "chat", "audit", "metrics", "health", "model"]
# Expected status of each endpoint for each credential: admin everything; user generates; auditor reads the
# audit log and metrics; no or a wrong credential is 401 (except /health, open to load-balancer probes).
# "model" is GET /v1/models/llama-tiny, which the restricted role may not use.
RBAC = {
    "admin": [200, 200, 200, 200, 200, 200, 200],
    "user": [200, 200, 200, 403, 403, 200, 200],
    "auditor": [403, 403, 403, 200, 200, 200, 403],
    "restricted": [200, 403, 403, 403, 403, 200, 403],  # completions only, and only on mamba-tiny (below)
    None: [401, 401, 401, 401, 401, 200, 401],
    "sk-not-a-real-key": [401, 401, 401, 401, 401, 200, 401],
}


@pytest.mark.parametrize("who", list(RBAC), ids=[str(k) for k in RBAC])
def test_role_by_endpoint(server, who):
    credential = KEYS[who][0] if who in KEYS else who
    responses = [call(server, endpoint, credential) for endpoint in ENDPOINTS]
    got = [r.status_code for r in responses]
    assert got == RBAC[who], dict(zip(ENDPOINTS, got, strict=True))
    for r in responses:
        if r.status_code in (401, 403):
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == ("authentication_error" if r.status_code == 401 else "permission_error")
            assert (r.headers.get("WWW-Authenticate") == "Bearer") == (r.status_code == 401)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Token abc", "bearer"])
def test_malformed_authorization_header_is_401(server, header):
    server.sent[0] += 1
    r = httpx.post(server.url + "/v1/completions", json={"model": "llama-tiny", "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": header}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_roles_grant_models(server):
    key = KEYS["restricted"][0]
    assert call(server, "completions", key, model="mamba-tiny").status_code == 200
    refused = call(server, "completions", key, model="llama-tiny")
    assert refused.status_code == 403 and "llama-tiny" in refused.json()["error"]["message"]
    assert call(server, "completions", key, model="no-such-model").status_code == 403  # existence not leaked
    assert [m["id"] for m in call(server, "models", key).json()["data"]] == ["mamba-tiny"]
    assert call(server, "model", key, model="mamba-tiny").json()["id"] == "mamba-tiny"
    assert call(server, "model", key, model="no-such-model").status_code == 403  # as for llama-tiny
    assert call(server, "completions", KEYS["admin"][0], model="no-such-model").status_code == 404
    assert call(server, "model", KEYS["admin"][0], model="no-such-model").status_code == 404


def token(key, alg: str = "RS256", kid: str = "rsa-1", **claims) -> str:
    """A JWT signed with ``key``; a claim given as None is left out."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "email": "dana@example.com", "groups": ["llm-users"],
               "iat": now, "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg, headers={"kid": kid})


def unsigned(**claims) -> str:
    import base64

    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "email": "eve@example.com", "groups": ["llm-users"], "exp": now + 600}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({**payload, **claims})}."


def test_oidc_tokens(server, signing_keys):
    rsa_key, ec_key, rogue = signing_keys["rsa"], signing_keys["ec"], signing_keys["rogue"]
    cases = [
        # (token, endpoint, expected status)
        (token(rsa_key), "completions", 200),
        (token(ec_key, alg="ES256", kid="ec-1"), "chat", 200),
        (token(rsa_key, groups=["llm-auditors"]), "audit", 200),
        (token(rsa_key, groups=["llm-auditors"]), "completions", 403),
        (token(rsa_key, groups=["marketing"]), "completions", 403),  # valid identity, no mapped role
        (token(rsa_key, exp=int(time.time()) - 60), "completions", 401),  # expired
        (token(rsa_key, aud="another-app"), "completions", 401),
        (token(rsa_key, iss="https://evil.example"), "completions", 401),
        (token(rogue), "completions", 401),  # right kid, wrong key
        (token(rogue, kid="unknown"), "completions", 401),
        (unsigned(), "completions", 401),  # alg none
        (jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "email": "x", "exp": int(time.time()) + 60},
                    key="symmetric-secret-of-32-bytes-long!", algorithm="HS256"), "completions", 401),
        (token(rsa_key)[:-4] + "AAAA", "completions", 401),  # tampered signature
        # A header naming the other key type's kid: refused, never a 500 from the verifier.
        (token(rsa_key, kid="ec-1"), "completions", 401),
        (token(ec_key, alg="ES256", kid="rsa-1"), "completions", 401),
        (token(rsa_key, exp=None), "completions", 401),  # no expiry: required
        (token(rsa_key, email=None), "completions", 401),  # no claim naming the caller
        ("aaa.bbb.ccc", "completions", 401),  # three parts, not a JWT
    ]
    got = [call(server, endpoint, t).status_code for t, endpoint, _ in cases]
    assert got == [status for _, _, status in cases]
    # The official client sends a JWT like an API key.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=token(ec_key, alg="ES256", kid="ec-1"), max_retries=0)
    server.sent[0] += 1
    server.secrets.append(client.api_key)
    assert client.completions.create(model="llama-tiny", prompt="sso", max_tokens=2).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key=token(rsa_key, exp=int(time.time()) - 5), max_retries=0)
    server.sent[0] += 1
    server.secrets.append(bad.api_key)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        bad.completions.create(model="llama-tiny", prompt="sso", max_tokens=2)


def test_audit_log_holds_every_request_and_no_secret(server):
    call(server, "completions", KEYS["user"][0])
    call(server, "completions", KEYS["auditor"][0])  # refused: 403
    call(server, "completions", "sk-wrong")  # refused: 401
    time.sleep(0.2)
    records = query(server.audit.path)
    assert len(records) == server.sent[0]  # everything but /health, served or refused
    statuses = {r["status"] for r in records}
    assert {200, 401, 403} <= statuses
    last = records[-3:]
    assert [(r["principal"], r["status"]) for r in last] == [("user-key", 200), ("auditor-key", 403), (None, 401)]
    assert last[0]["role"] == "user" and last[0]["prompt"] == "hello" and last[0]["completion_tokens"] >= 1
    assert isinstance(last[0]["output"], str) and last[0]["latency_ms"] > 0
    assert any(r["auth"] == "oidc" and r["principal"] == "dana@example.com" for r in records)
    text = server.audit.path.read_text()
    for secret in server.secrets:
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text


def test_audit_endpoint_filters_by_principal_and_time(server):
    auditor = KEYS["auditor"][0]
    headers = {"Authorization": f"Bearer {auditor}"}

    def audit(**params) -> list[dict]:
        server.sent[0] += 1
        r = httpx.get(server.url + "/v1/audit", params=params, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    since = time.time()
    time.sleep(0.01)
    call(server, "completions", KEYS["user"][0])  # 200
    call(server, "completions", KEYS["admin"][0])  # 200, another principal
    call(server, "audit", KEYS["user"][0])  # 403
    time.sleep(0.01)
    until = time.time()
    time.sleep(0.01)
    call(server, "completions", KEYS["user"][0])  # after the window
    time.sleep(0.2)

    window = audit(since=str(since), until=str(until))
    assert [(r["principal"], r["status"]) for r in window] == [("user-key", 200), ("admin-key", 200),
                                                                ("user-key", 403)]
    mine = audit(principal="user-key", since=str(since), until=str(until))
    assert [(r["principal"], r["endpoint"], r["status"]) for r in mine] == [("user-key", "completions", 200),
                                                                             ("user-key", "audit", 403)]
    assert len(audit(principal="user-key", since=str(since))) == 3  # no until: the later request too
    assert audit(principal="admin-key", since=str(since))[0]["prompt"] == "hello"
    assert [r["status"] for r in audit(status="403", since=str(since))] == [403]
    iso = datetime.fromtimestamp(since, timezone.utc).isoformat()  # ISO 8601 works as Unix seconds do
    assert audit(principal="user-key", since=iso, until=str(until)) == mine
    assert audit(principal="nobody") == []
    assert len(audit(limit="1")) == 1
    for params, field in [({"since": "not a time"}, "since"), ({"limit": "0"}, "limit"), ({"status": "x"}, "status")]:
        server.sent[0] += 1
        r = httpx.get(server.url + "/v1/audit", params=params, headers=headers)
        assert r.status_code == 400 and field in r.json()["error"]["message"]


def test_without_auth_only_loopback_binds():
    with pytest.raises(ValueError, match="only binds to loopback"):
        bind("0.0.0.0", 0, authenticated=False)
    with pytest.raises(SystemExit, match="loopback"):
        main(["serve", "llama-tiny", "--host", "0.0.0.0", "--port", "0"])
    bind("127.0.0.1", 0, authenticated=False).close()
    bind("0.0.0.0", 0, authenticated=True).close()


def test_auth_file_errors_name_the_field(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[[keys]]\nprincipal = "x"\nrole = "boss"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(ValueError, match=r"keys\[0\].role: expected one of"):
        AuthConfig.load(f)
    f.write_text('[[keys]]\nprincipal = "x"\nrole = "user"\nsha256 = "plaintext-key"\n')
    with pytest.raises(ValueError, match="64 hex digits"):
        AuthConfig.load(f)
    f.write_text('[roles.x]\nendpoints = ["everything"]\n')
    with pytest.raises(ValueError, match="unknown"):
        AuthConfig.load(f)
    f.write_text('[oidc]\nissuer = "i"\naudience = "a"\njwks_file = "missing.json"\n')
    with pytest.raises(FileNotFoundError, match="missing.json"):
        AuthConfig.load(f)


def test_yaml_auth_file_equals_toml(tmp_path, auth_file):
    yaml = pytest.importorskip("yaml")
    toml = AuthConfig.load(auth_file)
    (tmp_path / "jwks.json").write_text((auth_file.parent / "jwks.json").read_text())
    (tmp_path / "auth.yaml").write_text(yaml.safe_dump({
        "keys": [{"principal": f"{role}-key", "role": role, "sha256": digest} for role, (_, digest) in KEYS.items()],
        "roles": {"restricted": {"endpoints": ["models", "completions"], "models": ["mamba-tiny"]}},
        "oidc": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json", "roles_claim": "groups",
                 "principal_claim": "email", "role_map": {"llm-users": "user", "llm-auditors": "auditor"}},
    }))
    got = AuthConfig.load(tmp_path / "auth.yaml")
    assert (got.keys, got.roles) == (toml.keys, toml.roles)
    assert (got.oidc.issuer, got.oidc.audience, got.oidc.role_map, set(got.oidc.keys)) == \
        (toml.oidc.issuer, toml.oidc.audience, toml.oidc.role_map, set(toml.oidc.keys))


def test_jwks_encryption_keys_are_skipped(tmp_path, signing_keys):
    # Providers such as Keycloak publish an encryption key (use "enc", alg RSA-OAEP) beside the signing ones.
    sig = json.loads(RSAAlgorithm.to_jwk(signing_keys["rsa"].public_key())) | {"kid": "sig", "use": "sig"}
    enc = json.loads(RSAAlgorithm.to_jwk(signing_keys["rogue"].public_key())) | {"kid": "enc", "use": "enc",
                                                                                   "alg": "RSA-OAEP"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [sig, enc]}))
    (tmp_path / "a.toml").write_text('[oidc]\nissuer = "i"\naudience = "a"\njwks_file = "jwks.json"\n')
    assert set(AuthConfig.load(tmp_path / "a.toml").oidc.keys) == {"sig"}


def test_audit_log_rotates_by_size(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=2048, backups=2, keep_seconds=0)  # old files may go at once
    for i in range(100):
        log.write({"time": "2026-01-01T00:00:00Z", "principal": f"p{i}", "status": 200, "prompt": "x" * 50})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    assert all(p.stat().st_size <= 2048 for p in tmp_path.iterdir())
    kept = query(tmp_path / "a.jsonl")
    assert [r["principal"] for r in kept] == [f"p{i}" for i in range(100 - len(kept), 100)]  # newest, in order


def test_a_flood_of_huge_prompts_neither_bloats_records_nor_rotates_recent_ones_away(tmp_path):
    # The attack of the reliability issue: six refused 10.5 MB prompts rotated away every earlier record.
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=4096, backups=2)
    for i in range(20):
        log.write({"principal": "victim", "status": 200, "prompt": f"question {i}"})
    huge = "y" * 10_500_000
    for _ in range(60):
        log.write({"principal": "attacker", "status": 403, "prompt": huge, "output": [{"content": huge}]})
    records = query(tmp_path / "a.jsonl")
    assert [r["prompt"] for r in records if r["principal"] == "victim"] == [f"question {i}" for i in range(20)]
    stored = next(r["prompt"] for r in records if r["principal"] == "attacker")
    assert stored["bytes"] == len(huge) and stored["sha256"] == hashlib.sha256(huge.encode()).hexdigest()
    assert len(stored["truncated"]) == 16_384
    assert all(p.stat().st_size < 40_000 + 4096 for p in tmp_path.iterdir())  # bounded records
    assert len(list(tmp_path.iterdir())) > 3  # more files than `backups`: none was young enough to drop


def test_a_torn_last_line_is_set_aside_at_start_not_glued_to_the_next_record(tmp_path):
    path = tmp_path / "a.jsonl"
    AuditLog(path).write({"principal": "before", "status": 200})
    with open(path, "ab") as f:
        f.write(b'{"principal": "killed mid-wri')  # kill -9 during a write
    log = AuditLog(path)
    assert log.torn is not None and log.torn.read_bytes() == b'{"principal": "killed mid-wri'
    log.write({"principal": "after", "status": 200})
    assert [json.loads(x)["principal"] for x in path.read_text().splitlines()] == ["before", "after"]
    assert AuditLog(path).torn is None  # a whole log is left as it is


def test_apikey_command_prints_a_key_and_its_hash_for_the_auth_file(tmp_path, capsys):
    main(["apikey", "--principal", "alice", "--role", "auditor"])
    out = capsys.readouterr().out
    key = out.split("stored nowhere): ")[1].split()[0]
    (tmp_path / "auth.toml").write_text(out)
    auth = AuthConfig.load(tmp_path / "auth.toml")
    assert auth.keys == {hashlib.sha256(key.encode()).hexdigest(): ("alice", "auditor")}


def test_audit_log_escapes_what_utf8_cannot_hold(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    log.write({"principal": "p", "prompt": "lone \ud800 surrogate", "status": 400})
    log.write({"principal": "q", "prompt": "caf\u00e9", "status": 200})
    raw = (tmp_path / "a.jsonl").read_bytes()
    raw.decode("utf-8")  # still UTF-8, one JSON object a line
    assert [r["prompt"] for r in query(tmp_path / "a.jsonl")] == ["lone \ud800 surrogate", "caf\u00e9"]
