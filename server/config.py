"""The server's YAML config, validated into typed classes (same error style as model.yaml).

    repository: models            # model repository root
    host: 127.0.0.1
    grpc_port: 8001
    metrics_port: 8002            # Prometheus /metrics on its own HTTP port; 0 disables
    max_message_bytes: 67108864
    grace_period_s: 20            # SIGTERM: stop admitting, finish in-flight, then exit
    budget_margin_ms: 1.0         # taken off each budget for the response's way back
    policy: innfer                # innfer | slackfit | fixed:<tier>
    backend: null                 # override every model's backend preference
    tls: {cert: server.crt, key: server.key, client_ca: null}   # client_ca -> mTLS required
    auth: {bearer_token_file: token.txt}                         # health stays open

Example:
    >>> cfg = ServerConfig.from_dict({"repository": "models", "grpc_port": 0})
    >>> cfg.host, cfg.metrics_port
    ('127.0.0.1', 8002)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runtime.repository.config import ConfigError, read_yaml


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # when set, clients must present a certificate it signed


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period_s: float = 20.0
    budget_margin_ms: float = 1.0  # subtracted from every budget: the response's way back
    policy: str = "innfer"
    backend: str | None = None
    tls: TLSConfig | None = None
    bearer_token: str | None = None
    models: tuple[str, ...] = ()  # empty: every model in the repository
    source: str = "<config>"

    @classmethod
    def load(cls, path: str | Path) -> ServerConfig:
        path = Path(path)
        data = read_yaml(path) or {}
        return cls.from_dict(data, source=str(path), base=path.parent)

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "<config>", base: Path | None = None
    ) -> ServerConfig:
        def fail(field: str, value: Any, expected: str):
            raise ConfigError(f"{source}: {field}: got {value!r}, expected {expected}")

        if not isinstance(data, dict):
            fail("", data, "a mapping")
        known = {
            "repository", "host", "grpc_port", "metrics_port", "max_message_bytes",
            "grace_period_s", "policy", "backend", "tls", "auth", "models", "budget_margin_ms",
        }  # fmt: skip
        for k in data:
            if k not in known:
                fail(k, data[k], f"a known field ({', '.join(sorted(known))})")
        base = base or Path(".")

        def path(field: str, v: Any, must_exist: bool = True) -> Path:
            if not isinstance(v, str) or not v:
                fail(field, v, "a path")
            p = Path(v) if Path(v).is_absolute() else base / v
            if must_exist and not p.exists():
                fail(field, v, "an existing file")
            return p

        def port(field: str, default: int) -> int:
            v = data.get(field, default)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
                fail(field, v, "a port number in [0, 65535] (0: pick a free port)")
            return v

        if "repository" not in data:
            fail("repository", None, "a model repository directory (required)")
        repo = path("repository", data["repository"], must_exist=False)
        tls = None
        if data.get("tls") is not None:
            t = data["tls"]
            if not isinstance(t, dict) or "cert" not in t or "key" not in t:
                fail("tls", t, "a mapping with cert, key and optional client_ca")
            ca = t.get("client_ca")
            tls = TLSConfig(
                path("tls.cert", t["cert"]),
                path("tls.key", t["key"]),
                path("tls.client_ca", ca) if ca else None,
            )
        token = None
        if data.get("auth") is not None:
            a = data["auth"]
            if not isinstance(a, dict) or set(a) - {"bearer_token_file", "bearer_token"}:
                fail("auth", a, "a mapping with bearer_token_file (or bearer_token)")
            if "bearer_token_file" in a:
                token = path("auth.bearer_token_file", a["bearer_token_file"]).read_text().strip()
            else:
                token = a.get("bearer_token")
            if not isinstance(token, str) or len(token) < 8:
                fail("auth", "<token>", "a bearer token of at least 8 characters")
        grace = data.get("grace_period_s", 20.0)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 3600:
            fail("grace_period_s", grace, "seconds in [0, 3600]")
        margin = data.get("budget_margin_ms", 1.0)
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not 0 <= margin < 1e4
        ):
            fail("budget_margin_ms", margin, "milliseconds in [0, 10000)")
        max_msg = data.get("max_message_bytes", 64 * 1024 * 1024)
        if isinstance(max_msg, bool) or not isinstance(max_msg, int) or max_msg < 1024:
            fail("max_message_bytes", max_msg, "an integer >= 1024")
        policy = data.get("policy", "innfer")
        if not isinstance(policy, str) or not (
            policy in ("innfer", "slackfit") or policy.startswith("fixed:")
        ):
            fail("policy", policy, "innfer, slackfit or fixed:<tier>")
        backend = data.get("backend")
        if backend not in (None, "onnxruntime", "tensorrt", "torch"):
            fail("backend", backend, "onnxruntime, tensorrt or torch")
        models = data.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            fail("models", models, "a list of model names")
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            fail("host", host, "a host address such as 127.0.0.1")
        return cls(
            repository=repo,
            host=host,
            grpc_port=port("grpc_port", 8001),
            metrics_port=port("metrics_port", 8002),
            max_message_bytes=max_msg,
            grace_period_s=float(grace),
            budget_margin_ms=float(margin),
            policy=policy,
            backend=backend,
            tls=tls,
            bearer_token=token,
            models=tuple(models),
            source=source,
        )


def safe_dump(cfg: ServerConfig) -> str:
    """The config as YAML with the token masked (for logs)."""
    data = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}
    data["bearer_token"] = "***" if cfg.bearer_token else None
    data["tls"] = None if cfg.tls is None else {k: str(v) for k, v in cfg.tls.__dict__.items()}
    return yaml.safe_dump(data, sort_keys=False)
