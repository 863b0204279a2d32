"""All DPIG networks of one configuration in one module, so that one weights file holds a model."""

from __future__ import annotations

from torch import nn

from dpig_core.config import DPIGConfig
from dpig_core.models.decoder import UNetDecoder
from dpig_core.models.discriminator import DCGANDiscriminator
from dpig_core.models.encoder import build_encoder
from dpig_core.models.mlp import Critic, Mapping
from dpig_core.models.pose_ae import PoseAE


def factor_dims(config: DPIGConfig) -> dict[str, tuple[int, int]]:
    """(embedding dim, Φ hidden width) of each sampled factor: fg, bg (Market only), pose."""
    dims = {"fg": (config.fg_dim, config.map_hidden_fg)}
    if config.has_bg:
        dims["bg"] = (config.bg_dim, config.map_hidden_bg)
    dims["pose"] = (config.pose_dim, config.map_hidden_pose)
    return dims


class DPIG(nn.Module):
    """Stage I (encoder, decoder, discriminator), the pose AE and Stage II (Φ and a critic per factor).

    Sub-networks are plain attributes so that each training stage optimises its own parameters.
    """

    def __init__(self, config: DPIGConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = UNetDecoder(config)
        self.discriminator = DCGANDiscriminator(config)
        self.pose_ae = PoseAE(config)
        dims = factor_dims(config)
        self.mappings = nn.ModuleDict(
            {k: Mapping(d, h, config.mlp_blocks) for k, (d, h) in dims.items()}
        )
        self.critics = nn.ModuleDict(
            {k: Critic(d, config.critic_hidden, config.critic_layers) for k, (d, _) in dims.items()}
        )
