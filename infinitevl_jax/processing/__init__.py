"""Host-side preprocessing: tokenizer, Qwen2-VL chat template, image and video pixels, M-RoPE positions.

Pure numpy/PIL/tokenizers (PyAV only for video files); no JAX, grain or transformers.
"""

from infinitevl_jax.processing.chat_template import DEFAULT_SYSTEM, ConversationError, render, render_segments
from infinitevl_jax.processing.image import ImageProcessorConfig, load_image, process_image, smart_resize
from infinitevl_jax.processing.processor import IGNORE_INDEX, Processor
from infinitevl_jax.processing.tokenizer import Tokenizer
from infinitevl_jax.processing.video import VideoProcessorConfig, process_video

__all__ = [
    "DEFAULT_SYSTEM", "ConversationError", "IGNORE_INDEX", "ImageProcessorConfig", "Processor", "Tokenizer",
    "VideoProcessorConfig", "load_image", "process_image", "process_video", "render", "render_segments", "smart_resize",
]
