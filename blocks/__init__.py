"""Sequence mixers, MLP/MoE layers and the language model that stacks them."""
from blocks.attention import Attention, AttentionConfig
from blocks.mamba import Mamba, MambaConfig
from blocks.mamba2 import Mamba2, Mamba2Config
from blocks.mixer import Mixer
from blocks.registry import lookup, make_config, register

# The registry of sequence mixers: name -> (config dataclass, module class).
MIXERS: dict[str, tuple[type, type[Mixer]]] = {
    "mamba": (MambaConfig, Mamba),
    "mamba2": (Mamba2Config, Mamba2),
    "attention": (AttentionConfig, Attention),
}


def build_mixer(name: str, d_model: int, cfg=None) -> Mixer:
    """Build the mixer registered as `name`; cfg is None, its config dataclass, or a dict of its fields."""
    cfg_cls, mixer_cls = lookup(MIXERS, name, "mixer")
    return mixer_cls(d_model, make_config(cfg_cls, cfg, f"mixer '{name}'"))


def register_mixer(name: str, config_cls: type):
    """Class decorator: register a Mixer subclass as `name` (mixer=<name>), built as cls(d_model, config_cls(...)).

        @register_mixer("my_mixer", MyMixerConfig)
        class MyMixer(Mixer): ...

    Raises ValueError for a name already taken, a config that is not a dataclass, or a class that is no Mixer."""

    def decorate(cls: type) -> type:
        register(MIXERS, name, config_cls, cls, Mixer, "mixer")
        return cls

    return decorate
