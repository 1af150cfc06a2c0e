"""Training data for πRefine and πθ: records -> token ids -> length-bucketed micro-batches.

Each example is `prompt ids + target ids + EOS`; the loss is taken on the target only. Two things keep the
CPU (and GPU) time on real tokens rather than padding, unlike the reference that pads everything to 1024:

* micro-batches are built from length-sorted examples, so a batch is padded only to its own longest member
  (typically a few tokens); the order of the micro-batches is reshuffled every epoch with the seed;
* the sampler knows every optimizer step in advance, so each micro-batch carries the number of target tokens of
  its whole step (all accumulation micro-batches, all ranks). The loss is normalised by that number, which makes
  the gradient the same whether a step is split into 1 x 8, 2 x 4 or 2 ranks x 2 x 2 examples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ilf_lab.data.prompts import Task, refine_prompt, target_for, task_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# An example keeps at least this many prompt tokens (fewer if its prompt is shorter); otherwise it is dropped.
MIN_PROMPT_TOKENS = 8
OLD_CODE_TRUNCATION_MARK = "\n# ... (truncated)"


@dataclass(frozen=True)
class RefinerRecord:
    """One πRefine training example: (task, incorrect program x0, feedback f) -> refinement x1 (full programs)."""

    task: Task
    old_code: str
    feedback: str
    refinement: str


@dataclass(frozen=True)
class PolicyRecord:
    """One πθ training example: task -> a correct program (a refinement or the gold code)."""

    task: Task
    program: str


@dataclass(frozen=True)
class Example:
    """Token ids of prompt + target (+ EOS); the first `prompt_len` ids get no loss."""

    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def target_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode_pair(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[Example | None, bool]:
    """(example, truncated): the prompt is cut from the left to fit; None when the target itself does not fit.

    The prompt is tokenised as a sampler would tokenise it (`tokenizer(prompt)`), the target without special
    tokens and followed by EOS, so the model learns to stop.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    room = max_length - len(target_ids)
    if room < min(MIN_PROMPT_TOKENS, len(prompt_ids)) or room < 1:
        return None, False
    truncated = len(prompt_ids) > room
    if truncated:
        bos = tokenizer.bos_token_id
        if bos is not None and prompt_ids[0] == bos:  # keep the BOS the model always saw first
            prompt_ids = [bos] + prompt_ids[len(prompt_ids) - room + 1 :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
    return Example(tuple(prompt_ids + target_ids), len(prompt_ids)), truncated


# ------------------------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class MicroBatch:
    """What the sampler yields: the example indices of one micro-batch on this rank.

    `step_target_tokens` counts the target tokens of the whole optimizer step (all its micro-batches, all
    ranks): the loss normaliser. `filler` marks a stand-in row for a rank that got no example in the last,
    short micro-batch of an epoch (it runs forward/backward so DDP stays in step, with no loss).
    """

    indices: tuple[int, ...]
    step_target_tokens: int
    filler: bool = False


class MicroBatchSampler:
    """Yields this rank's `MicroBatch`es for one epoch (a batch sampler for `DataLoader`).

    bucket=True: examples sorted by length (random tie-break) are cut into global micro-batches of
    micro_batch_size x world_size, so each rank's slice is padded only to its own longest example; the order
    of the micro-batches is shuffled per epoch. bucket=False: a random permutation instead of the sort.
    Consecutive groups of `accumulate` micro-batches form one optimizer step (the last may be shorter, as in
    Lightning's accumulation).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        target_lengths: Sequence[int],
        micro_batch_size: int,
        accumulate: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        bucket: bool = True,
    ) -> None:
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = np.asarray(lengths)
        self.target_lengths = np.asarray(target_lengths)
        self.micro_batch_size, self.accumulate = micro_batch_size, accumulate
        self.world_size, self.rank, self.seed, self.bucket = world_size, rank, seed, bucket
        self.epoch = 0
        # Lightning calls `dataloader.batch_sampler.sampler.set_epoch(epoch)` at every epoch start
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / (self.micro_batch_size * self.world_size))

    def global_plan(self, epoch: int) -> list[list[np.ndarray]]:
        """Optimizer steps of the epoch, each a list of global micro-batches (index arrays, all ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if self.bucket:
            order = np.lexsort((rng.random(n), self.lengths))  # by length, ties in random order
        else:
            order = rng.permutation(n)
        chunks = np.array_split(order, len(self))  # sizes differ by at most one
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return [chunks[i : i + self.accumulate] for i in range(0, len(chunks), self.accumulate)]

    def __iter__(self) -> Iterator[MicroBatch]:
        for step in self.global_plan(self.epoch):
            step_tokens = int(sum(self.target_lengths[c].sum() for c in step))
            for chunk in step:
                mine = np.array_split(chunk, self.world_size)[self.rank]
                if len(mine):
                    yield MicroBatch(tuple(int(i) for i in mine), step_tokens)
                else:
                    yield MicroBatch((int(chunk[0]),), step_tokens, filler=True)


def collate(examples: Sequence[Example], pad_id: int, step_target_tokens: int, filler: bool = False) -> dict:
    """Right-pad to the longest example; labels are -100 on the prompt, on padding (and on filler rows)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        if not filler:
            labels[row, e.prompt_len : len(ids)] = ids[e.prompt_len :]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "step_target_tokens": torch.tensor(step_target_tokens, dtype=torch.long),
    }


class ExampleDataset(Dataset):
    """Tokenised examples; `__getitems__` turns a whole `MicroBatch` into padded tensors at once."""

    def __init__(self, examples: Sequence[Example], pad_id: int) -> None:
        self.examples, self.pad_id = list(examples), pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __getitems__(self, mb: MicroBatch) -> dict:  # called by DataLoader with what the batch sampler yields
        return collate([self.examples[i] for i in mb.indices], self.pad_id, mb.step_target_tokens, mb.filler)


def _already_collated(batch: dict) -> dict:
    return batch


# ------------------------------------------------------------------------------------------------ DataModules


class CausalLMDataModule(pl.LightningDataModule):
    """Tokenises records once (eagerly: the sets are small, and `finetune` needs the counts up front) and serves
    length-bucketed micro-batches for this rank. Subclasses say how a record becomes (prompt, target)."""

    def __init__(
        self,
        records: Sequence[Any],
        tokenizer: Any,
        prompt_format: str,
        max_length: int,
        micro_batch_size: int,
        accumulate: int = 1,
        seed: int = 0,
        bucket: bool = True,
    ) -> None:
        super().__init__()
        self.prompt_format, self.max_length = prompt_format, max_length
        self.micro_batch_size, self.accumulate, self.seed, self.bucket = (
            micro_batch_size,
            accumulate,
            seed,
            bucket,
        )
        self.examples: list[Example] = []
        self.dropped = self.truncated = 0
        for r in records:
            example, truncated = self.encode(r, tokenizer)
            if example is None:
                self.dropped += 1
                continue
            self.examples.append(example)
            self.truncated += truncated
        if self.dropped:
            log.warning(
                "%d of %d examples dropped: their target does not fit in max_length=%d",
                self.dropped,
                len(records),
                max_length,
            )
        if self.truncated:
            log.info(
                "%d examples had their prompt truncated to fit max_length=%d", self.truncated, max_length
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, record: Any, tokenizer: Any) -> tuple[Example | None, bool]:
        raise NotImplementedError

    def sampler(self, world_size: int = 1, rank: int = 0) -> MicroBatchSampler:
        return MicroBatchSampler(
            [len(e.input_ids) for e in self.examples],
            [e.target_len for e in self.examples],
            self.micro_batch_size,
            self.accumulate,
            world_size,
            rank,
            self.seed,
            self.bucket,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        return DataLoader(
            ExampleDataset(self.examples, self.pad_id),
            batch_sampler=self.sampler(world, rank),
            collate_fn=_already_collated,
        )


class PolicyDataModule(CausalLMDataModule):
    """πθ: prompt = `task_prompt(task)`, target = the program in the format's own shape."""

    def encode(self, record: PolicyRecord, tokenizer: Any) -> tuple[Example | None, bool]:
        prompt = task_prompt(record.task, self.prompt_format, tokenizer)
        target = target_for(record.task, record.program, self.prompt_format)
        return encode_pair(tokenizer, prompt, target, self.max_length)


class RefinerDataModule(CausalLMDataModule):
    """πRefine: prompt = (task, OLD CODE, FEEDBACK) (the paper's Figure 2 for docstring), target = refinement.

    Too long: OLD CODE is shortened first (its tail replaced by a mark), since the task, the feedback and the
    prompt's end (the function signature / the opened code fence) matter more; then the prompt is cut from the left.
    """

    def encode(self, record: RefinerRecord, tokenizer: Any) -> tuple[Example | None, bool]:
        fmt, task = self.prompt_format, record.task
        target = target_for(task, record.refinement, fmt)
        old_code = record.old_code
        prompt = refine_prompt(task, old_code, record.feedback, fmt, tokenizer)

        def n_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        overflow = n_tokens(prompt) + n_tokens(target) + 1 - self.max_length
        if overflow > 0:
            old_ids = tokenizer(old_code.strip("\n"), add_special_tokens=False)["input_ids"]
            keep = max(0, len(old_ids) - overflow - n_tokens(OLD_CODE_TRUNCATION_MARK))
            old_code = tokenizer.decode(old_ids[:keep]) + OLD_CODE_TRUNCATION_MARK
            prompt = refine_prompt(task, old_code, record.feedback, fmt, tokenizer)
        example, truncated = encode_pair(tokenizer, prompt, target, self.max_length)
        return example, truncated or overflow > 0


DATAMODULES: dict[str, type[CausalLMDataModule]] = {"refiner": RefinerDataModule, "policy": PolicyDataModule}
