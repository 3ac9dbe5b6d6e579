"""OpenAI-compatible HTTP serving: continuous batching, API keys and OIDC roles, audit log, metrics.

Needs the ``serve`` extra (``pip install "hybridlm[serve]"``). Start it with ``hybridlm serve MODEL...`` (a MODEL
may be a composition-of-experts directory) or from Python with ``create_app`` and ``run``.
"""

from hybridlm.chat_template import ChatTemplate
from hybridlm.serve.app import BackgroundServer, ServedComposition, ServedModel, create_app, run
from hybridlm.serve.audit import AuditLog
from hybridlm.serve.auth import AuthConfig, new_api_key
from hybridlm.serve.protocol import Limits
from hybridlm.serve.scheduler import GenerationRequest, SamplingParams, Scheduler

__all__ = ["AuditLog", "AuthConfig", "BackgroundServer", "ChatTemplate", "GenerationRequest", "Limits",
           "SamplingParams", "Scheduler", "ServedComposition", "ServedModel", "create_app", "new_api_key", "run"]
