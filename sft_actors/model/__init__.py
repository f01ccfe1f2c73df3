"""Models written for splitting: Llama-family decoders and ViTs, LoRA, loaders, memory model.

Pure torch: nothing here imports actors, transport or runtime.

    spec = resolve_spec("smollm2-135m")
    model = load_model(spec)                                  # frozen base
    device, server = split_model(model, cut=4, server_start=2, lora=LoraConfig(rank=8))
    hidden = device(ids)                                      # (B, T, C) at the cut
    x = hidden.detach().requires_grad_()                      # on the server
    loss = server.loss(server(x, cut=4), labels); loss.backward()
    device.backward_from(hidden, x.grad)                      # x.grad travels back
"""

from sft_actors.model.base import SplitLM
from sft_actors.model.config import PRESETS, LlamaConfig, LoraConfig, ModelConfig, RopeScaling, ViTConfig
from sft_actors.model.export import export_hf_llama, export_peft, load_lora, merge_lora, save_lora
from sft_actors.model.llama import IGNORE_INDEX, Llama
from sft_actors.model.lora import LoraAdapter, randomize_lora_B
from sft_actors.model.memory import (
    MemoryEstimate,
    block_param_count,
    embedding_param_count,
    estimate_device_memory,
    flops_per_block,
    head_param_count,
    lora_param_count,
)
from sft_actors.model.spec import ModelSpec, load_config, load_model, resolve_spec
from sft_actors.model.split import (
    DevicePart,
    FullPart,
    Part,
    ServerPart,
    head_state_dict,
    load_lora_state_dict,
    lora_state_dict,
    make_device_part,
    make_full_part,
    split_model,
)
from sft_actors.model.tokenizer import BpeTokenizer, ByteTokenizer, Tokenizer
from sft_actors.model.verify import VerifyResult, sample_batch, verify_split
from sft_actors.model.vit import ViT

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "BpeTokenizer",
    "ByteTokenizer",
    "DevicePart",
    "FullPart",
    "Llama",
    "LlamaConfig",
    "LoraAdapter",
    "LoraConfig",
    "MemoryEstimate",
    "ModelConfig",
    "ModelSpec",
    "Part",
    "RopeScaling",
    "ServerPart",
    "SplitLM",
    "Tokenizer",
    "VerifyResult",
    "ViT",
    "ViTConfig",
    "block_param_count",
    "embedding_param_count",
    "estimate_device_memory",
    "export_hf_llama",
    "export_peft",
    "flops_per_block",
    "head_param_count",
    "head_state_dict",
    "load_config",
    "load_lora",
    "load_lora_state_dict",
    "load_model",
    "lora_param_count",
    "lora_state_dict",
    "make_device_part",
    "make_full_part",
    "merge_lora",
    "randomize_lora_B",
    "resolve_spec",
    "sample_batch",
    "save_lora",
    "split_model",
    "verify_split",
]
