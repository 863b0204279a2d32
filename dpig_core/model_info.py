"""Parameter and forward-MAC counts of every network of a configuration (spec §9)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpig_core.config import DPIGConfig
from dpig_core.models import DPIG, factor_dims
from dpig_core.pose import NUM_KEYPOINTS, NUM_ROIS


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(run: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops() // 2)


def model_info(config: DPIGConfig) -> dict[str, Any]:
    """Per network: parameters and forward MACs for one image (computed on the meta device, so the
    full-size presets cost nothing to measure)."""
    h, w = config.height, config.width
    with torch.device("meta"):
        model = DPIG(config)
        image = torch.zeros(1, 3, h, w)
        mask = torch.zeros(1, 1, h, w)
        boxes, vis = torch.zeros(1, NUM_ROIS, 4), torch.ones(1, NUM_ROIS)
        embedding = torch.zeros(1, config.embedding_dim)
        maps = torch.zeros(1, NUM_KEYPOINTS, h, w)
        pose_in, code = torch.zeros(1, NUM_KEYPOINTS * 3), torch.zeros(1, config.pose_dim)

        decoder = model.decoder
        decoder.early_up_conv = False  # the reference's layer order (same numbers, more MACs)
        decoder.fast_input_conv = False
        plain = _macs(lambda: decoder(embedding, maps))
        decoder.fast_input_conv = True
        fast = _macs(lambda: decoder(embedding, maps))
        networks: dict[str, dict[str, int]] = {
            "encoder": {
                "params": _params(model.encoder),
                "macs": _macs(lambda: model.encoder(image, mask, boxes, vis)),
            },
            "decoder": {"params": _params(decoder), "macs": plain, "macs_fast_input_conv": fast},
            "discriminator": {
                "params": _params(model.discriminator),
                "macs": _macs(lambda: model.discriminator(image)),
            },
            "pose_encoder": {
                "params": _params(model.pose_ae.encoder),
                "macs": _macs(lambda: model.pose_ae.encode(pose_in)),
            },
            "pose_decoder": {
                "params": _params(model.pose_ae.decoder),
                "macs": _macs(lambda: model.pose_ae.decode(code)),
            },
        }
        for factor, (dim, _) in factor_dims(config).items():
            z = torch.zeros(1, dim)
            for kind, net in (
                ("mapping", model.mappings[factor]),
                ("critic", model.critics[factor]),
            ):
                networks[f"{kind}_{factor}"] = {
                    "params": _params(net),
                    "macs": _macs(partial(net, z)),
                }
    generator = {k: networks["encoder"][k] + networks["decoder"][k] for k in ("params", "macs")}
    return {
        "preset": config.name,
        "image": [h, w],
        "embedding_dim": config.embedding_dim,
        "networks": networks,
        "totals": {
            "stage1_generator": generator,
            "all": {
                "params": sum(n["params"] for n in networks.values()),
                "macs": sum(n["macs"] for n in networks.values()),
            },
        },
    }
