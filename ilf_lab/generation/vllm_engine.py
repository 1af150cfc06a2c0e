"""vLLM behind the `Engine` interface (GPU; `pip install ilf_lab[vllm]`). Same contract as the HF engine:
n completions per prompt, cut before the first stop string, EOS removed, greedy produced once and copied."""

from __future__ import annotations

from collections.abc import Sequence

from ilf_lab.generation.params import SamplingParams, trivial_completions
from ilf_lab.generation.sampling import cut_at_stop, prompt_seeds


class VLLMEngine:
    """Wraps `vllm.LLM`; `batch_size` caps concurrent sequences (vLLM's max_num_seqs)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        batch_size: int | None = None,
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("the vllm engine needs `pip install ilf_lab[vllm]` (Linux + CUDA)") from e
        kwargs = {"max_num_seqs": batch_size} if batch_size else {}
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, progress: bool = False
    ) -> list[list[str]]:
        from vllm import SamplingParams as VParams

        prompts = list(prompts)
        if (done := trivial_completions(prompts, params)) is not None:
            return done
        n = 1 if params.greedy else params.n
        # one request per sample with its own seed: samples independent of batch composition, as in hf
        seeds = prompt_seeds(prompts, params.seed, n)
        reqs, vparams = [], []
        for p, ss in zip(prompts, seeds, strict=True):
            for s in ss:
                reqs.append(p)
                vparams.append(
                    VParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p if not params.greedy else 1.0,
                        max_tokens=params.max_new_tokens,
                        stop=list(params.stop) or None,
                        seed=None if params.greedy else s % (2**31),
                        skip_special_tokens=False,
                    )
                )
        outs = self.llm.generate(reqs, vparams, use_tqdm=progress)
        texts = [cut_at_stop(o.outputs[0].text, params.stop) for o in outs]
        result = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
        if n != params.n:
            result = [[r[0]] * params.n for r in result]
        return result
