"""A job that leaves Edge Pruning settings unset runs with the library's own defaults.

The API server fills defaults in without importing torch; both it and ``PruneConfig`` take them
from ``edgeprune.engine.defaults``, and this test holds them together.
"""

from __future__ import annotations

import pytest

from edgeprune.engine.prune import PruneConfig
from edgeprune.service.config import Config
from edgeprune.service.validation import Violations, check_edge_pruning
from edgeprune.v1 import common_pb2, job_pb2


@pytest.mark.parametrize("steps", [1, 7, 40, 600, 3000])
def test_unset_edge_pruning_fields_get_prune_config_defaults(steps: int) -> None:
    spec = job_pb2.JobSpec(method=common_pb2.METHOD_EDGE_PRUNING)
    spec.edge_pruning.steps = steps
    v = Violations()
    check_edge_pruning(v, spec, Config(models={"m": "hf:x"}))
    v.raise_if_any()
    library = PruneConfig(steps=steps)
    ep = spec.edge_pruning
    assert ep.warmup_steps == library.target_warmup
    assert ep.mask_learning_rate == pytest.approx(library.edge_lr)
    assert ep.lambda_learning_rate == pytest.approx(library.lambda_lr)
