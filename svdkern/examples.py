"""Example inputs: the forward (or the input shapes) that the analysis verbs run a model on.

Every verb that runs the model on an example (`flops`, `prune`, `compress`, `decompose`,
`plan`, `tune_forms`, `set_memory_format`) takes it by the same keywords, checked here once:

    input_shape=(1, 3, 32, 32)          one input batch of that shape (a zero float tensor,
                                        random where it is timed), the model's dtype
    input_shape=[(1, 16), (256, 16)]    several shapes: `compress(policy="latency")` times
                                        every one, the other verbs take one
    example_inputs=(ids,)               the forward's positional arguments (any dtype)
    example_kwargs={"mask": m}          its keyword arguments (alone: a keyword-only call)
    example=Example(...)                the same as one object, built once for several verbs

Example::

    ex = svdkern.Example(example_inputs=(ids,), example_kwargs={"use_cache": False})
    svdkern.flops(gpt, example=ex)
    svdkern.prune(gpt, target_flops=0.5, example=ex)
    args, kwargs = ex.call(gpt)                  # gpt(*args, **kwargs) is the example forward
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Example", "Shape", "example_call"]

Shape = tuple[int, ...]


def _is_shape(value) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes, torch.Tensor))
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    )


def _shapes(input_shape) -> tuple[Shape, ...]:
    """One input shape or a non-empty list of them, as a tuple of shapes."""
    if _is_shape(input_shape):
        return (tuple(input_shape),)
    several = isinstance(input_shape, Sequence) and not isinstance(input_shape, (str, bytes))
    if several and input_shape and all(_is_shape(s) for s in input_shape):
        return tuple(tuple(s) for s in input_shape)
    raise ValueError(
        "input_shape must be a sequence of non-negative ints (the shape of one input batch, "
        "e.g. (1, 3, 32, 32)) or a list of them (e.g. [(1, 3, 32, 32), (256, 3, 32, 32)]), "
        f"got {input_shape!r}"
    )


class Example:
    """The example inputs of a model: one or several input shapes, or the forward's
    arguments. The constructor is the one check of `input_shape`, `example_inputs` and
    `example_kwargs` that every verb uses; `Example.of` adds the verbs' `example=`.

    Args:
        input_shape: shape of one input batch, batch included, or a list of shapes. The
            forward gets a float tensor of that shape in the dtype and on the device of
            the model's first parameter (zeros, or random numbers where a verb times it).
        example_inputs: instead, the forward's positional arguments: one tensor or a
            tuple (any dtype, e.g. int64 token ids; non-tensor values passed as they are).
        example_kwargs: the forward's keyword arguments (e.g. {"attention_mask": m}); may
            be given alone for a keyword-only call.
    Raises:
        ValueError when none is given, or both input_shape and example_inputs, or
        input_shape is not a shape or a list of shapes; TypeError when example_inputs is
        not a tensor or a tuple, or example_kwargs not a mapping.

    Example::

        Example(input_shape=(1, 3, 32, 32)).call(model)   # ((zeros(1, 3, 32, 32),), {})
        Example(example_inputs=ids, example_kwargs={"mask": m}).args   # (ids,)
    """

    __slots__ = ("args", "kwargs", "shapes")

    shapes: tuple[Shape, ...]
    args: tuple
    kwargs: dict[str, Any]

    def __init__(
        self,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        example_inputs: Any = None,
        example_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if input_shape is not None and example_inputs is not None:
            raise ValueError(
                "pass one of input_shape (the shape of one float input batch) and "
                "example_inputs (a tensor or a tuple of the model's positional arguments), "
                "not both"
            )
        if input_shape is None and example_inputs is None and example_kwargs is None:
            raise ValueError(
                "pass input_shape (the shape of one float input batch) or example_inputs (a "
                "tensor or a tuple of the model's positional arguments, plus example_kwargs)"
            )
        if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
            raise TypeError(
                f"example_kwargs must be a dict of the forward's keyword arguments, got "
                f"{type(example_kwargs).__name__}"
            )
        if isinstance(example_inputs, torch.Tensor):
            args: tuple = (example_inputs,)
        elif isinstance(example_inputs, (tuple, list)) or example_inputs is None:
            args = tuple(example_inputs or ())
        else:
            raise TypeError(
                "example_inputs must be a tensor or a tuple of the forward's positional "
                "arguments (keyword arguments go in example_kwargs), got "
                f"{type(example_inputs).__name__}"
            )
        self.shapes = () if input_shape is None else _shapes(input_shape)
        self.args = args
        self.kwargs = dict(example_kwargs or {})

    @classmethod
    def of(
        cls,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        example_inputs: Any = None,
        example_kwargs: Mapping[str, Any] | None = None,
        example: Example | None = None,
    ) -> Example | None:
        """The example of a verb's keywords: `example` as it is, else the `Example` of the
        other three, or None when none is given."""
        given = (input_shape, example_inputs, example_kwargs)
        if example is not None:
            if not isinstance(example, Example):
                raise TypeError(f"example must be a svdkern.Example, got {type(example).__name__}")
            if any(v is not None for v in given):
                raise ValueError(
                    "pass example or input_shape / example_inputs / example_kwargs, not both"
                )
            return example
        if all(v is None for v in given):
            return None
        return cls(input_shape, example_inputs, example_kwargs)

    @property
    def input_shape(self) -> Shape | None:
        """The first input shape (None when the example is the forward's arguments)."""
        return self.shapes[0] if self.shapes else None

    def single(self, verb: str) -> Example:
        """This example, which must be one forward: `verb` runs one."""
        if len(self.shapes) > 1:
            raise ValueError(
                f"input_shape: {verb} runs one example forward; pass one shape, got "
                f"{len(self.shapes)}: {list(self.shapes)}"
            )
        return self

    def first(self) -> Example:
        """The example of the first input shape alone (itself without shapes)."""
        if len(self.shapes) <= 1:
            return self
        return Example(self.shapes[0], example_kwargs=self.kwargs)

    def calls(
        self, model: nn.Module, fill: Callable[..., torch.Tensor] = torch.zeros
    ) -> list[tuple[tuple, dict[str, Any]]]:
        """The (args, kwargs) of every example forward `model(*args, **kwargs)`: one per
        input shape, an input `fill(shape, dtype=..., device=...)` (torch.zeros, or
        torch.randn where it is timed) like the model's first parameter; else the one
        call of the given arguments."""
        if not self.shapes:
            return [(self.args, dict(self.kwargs))]
        param = next(model.parameters(), None)
        factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        return [((fill(shape, **factory),), dict(self.kwargs)) for shape in self.shapes]

    def call(self, model: nn.Module) -> tuple[tuple, dict[str, Any]]:
        """The (args, kwargs) of the (first) example forward, a zero input for a shape."""
        return self.calls(model)[0]

    def run(self, model: nn.Module) -> Any:
        """`model(*args, **kwargs)` of `call(model)`; an error of the forward is re-raised
        as a ValueError naming the argument that produced the input (input_shape, or
        example_inputs / example_kwargs)."""
        args, kwargs = self.call(model)
        try:
            return model(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            if self.shapes:
                given = f"a zero input of input_shape={self.shapes[0]}"
                fix = "pass the shape the model expects (batch included) or example_inputs"
            else:
                given = f"example_inputs / example_kwargs ({self})"
                fix = "pass the arguments the model's forward expects"
            raise ValueError(
                f"the example forward of {type(model).__name__} failed on {given}: {err}; {fix}"
            ) from err

    def __str__(self) -> str:
        if self.shapes:
            shapes = ", ".join(map(str, self.shapes))
            kwargs = "".join(f", {k}={_describe(v)}" for k, v in self.kwargs.items())
            return f"input_shape {shapes}{kwargs}"
        parts = [_describe(a) for a in self.args]
        parts += [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"Example({self})"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def example_call(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) of the one example forward `model(*args, **kwargs)` of these
    arguments (see `Example`; one input shape).

    Example::

        args, kwargs = example_call(model, example_inputs=(ids,), example_kwargs={"mask": m})
        model(*args, **kwargs)
    """
    return Example(input_shape, example_inputs, example_kwargs).single("example_call").call(model)
