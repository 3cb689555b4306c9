"""nanoflow: a throughput-first LLM serving engine (a re-creation of NanoFlow, OSDI 2025)."""
from nanoflow.llm import LLM
from nanoflow.outputs import CompletionOutput, RequestOutput
from nanoflow.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StructuredOutputsParams"]
__version__ = "0.1.0"
