"""lmms-eval integration: the ``tokenreduce`` model for ``lmms-eval`` and the ``tokenreduce eval-vlm`` command.

Installed with ``pip install "tokenreduce[lmms]"``, lmms-eval finds the model through the ``lmms_eval.models``
entry point (``tokenreduce = tokenreduce.integrations.lmms_eval:manifests``)::

    lmms-eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,dominant=54,contextual=10 \\
        --tasks gqa,mme,pope --batch_size 8

Importing this package imports nothing from lmms-eval; :mod:`.model` does (lmms-eval loads it when the model is
asked for). See docs/evaluation_vlm.md.
"""
from __future__ import annotations

from typing import List

MODEL_NAME = "tokenreduce"
MODEL_CLASS = "tokenreduce.integrations.lmms_eval.model.TokenReduceLMM"


def manifests() -> List[object]:
    """The payload of the ``lmms_eval.models`` entry point: one ``ModelManifest`` for the ``tokenreduce`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest  # only ever called by lmms-eval itself

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)]


__all__ = ["MODEL_CLASS", "MODEL_NAME", "manifests"]
