"""sft_actors: split fine-tuning of transformers over an asyncio actor runtime on ZeroMQ."""

__version__ = "0.1.0"
