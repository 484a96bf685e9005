"""The torch-free half of the model repository: config, layout, engine cache, records,
latency profiles. The serving side imports this package; it never imports torch.

Example:
    >>> from runtime.repository import Repository  # doctest: +SKIP
    >>> served = Repository("models").load("mnist")  # doctest: +SKIP
"""

from runtime.hashing import sha256_file
from runtime.repository.cache import MANIFEST, EngineCache, engine_key
from runtime.repository.errors import InvalidModelName, ModelNotFound, RepositoryError
from runtime.repository.frontier import (
    ACTIVE_FILE,
    APPLY_BUSY,
    APPLY_KEPT,
    FRONTIER_DIR,
    FRONTIER_FILE,
    ActiveTiers,
    Candidate,
    Frontier,
)
from runtime.repository.records import TIER_FILE, TierRecord
from runtime.repository.store import PROFILE_FILE, Repository, ServedModel, check_model_name

__all__ = [
    "ACTIVE_FILE",
    "APPLY_BUSY",
    "APPLY_KEPT",
    "FRONTIER_DIR",
    "FRONTIER_FILE",
    "MANIFEST",
    "PROFILE_FILE",
    "TIER_FILE",
    "ActiveTiers",
    "Candidate",
    "EngineCache",
    "Frontier",
    "InvalidModelName",
    "ModelNotFound",
    "Repository",
    "RepositoryError",
    "ServedModel",
    "TierRecord",
    "check_model_name",
    "engine_key",
    "sha256_file",
]
