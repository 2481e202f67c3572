"""Virtual tokens in front of the input embeddings: the graph rewrite prompt_tuning and p_tuning share.

Mechanism (a graph rewrite at the embedding site). A site is the table the model's input
embedding reads (an "embedding" weight site, vocab x hidden); its aten.embedding E must look up
ids that come from a graph input (the input ids, possibly through views), and the graph must have
been captured with a dynamic sequence length. With v virtual tokens P (v x hidden, built by the
kind from its parameters) the rewrite is

    E'  = cat([P expanded over the batch, E], 1)        every reader of E reads E'
    n'  = n + v                                         every reader of sym_size(ids, 1) that is not
                                                        on the ids' own path to E reads n' (positions,
                                                        cache positions, causal masks, views)
    m'  = cat([ones(B, v), attention_mask], 1)          the graph input named attention_mask, if any
                                                        (after the fill of an optional one)
    t'  = cat([zeros(B, v), token_type_ids], 1)         the graph input named token_type_ids, if any
                                                        (BERT: the virtual tokens are of type 0)

while the ids' own views before the lookup keep n (GPT-2 views the ids by the mask's length: that
read is given sym_size(ids, -1) instead),
so everything the model derives from the sequence length sees n + v, as it does when PEFT feeds
inputs_embeds = [P | embed(ids)] and the longer mask (PeftModelForCausalLM.forward). A length read
from the mask or the token types (export may take the shared length from any of them) is n + v as
well, since those inputs are the longer ones. On an encoder (BERT) this is PEFT's SEQ_CLS path
(PeftModelForSequenceClassification.forward): the longer mask, token types with v zeros in front,
positions 0 .. n + v - 1 (the virtual tokens take the first ones), and the pooler reads position 0,
the first virtual token. The output keeps PEFT's shapes: logits (hidden states) for all n + v
positions, the v virtual ones first; a classifier's logits are per row. Each new node is
stamped with the adapter and records what it stands in for (meta "surgeon_input_of"), so removing
or deactivating the adapter puts E, n, the mask and the token types back (adapter_ops.detach).

Refused, with the reason: a static sequence length (the sizes are constants in the graph's
views), a graph input named position_ids (PEFT drops given positions for these kinds; a graph fed
positions of length n could not serve n + v), and an embedding whose ids are no graph input.

Generation: the KV-cache graphs take positions, a mask and a cache sized for the prompt, so a
module with an active virtual-token adapter generates on the recompute path (each step runs the
compiled module on the whole sequence, the virtual tokens in front, as PEFT's first step does).
Greedy, the tokens are PEFT's `generate(use_cache=False)`'s and its forward's, step by step; PEFT's
cached `generate` gives the same first new token (tests/adapters/test_prompt_tuning.py), but with
PEFT 0.21.2 and transformers 5.24 its later cached steps do not follow its own forward (on the tests'
LLaMA and GPT-2 alike). Nothing folds into a
weight: merge is refused.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ..errors import InputError
from ..inputs import fill_input
from . import aten

KINDS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning", "cpt")   # the kinds that lengthen the sequence (surgeon.generate reads it)
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default, aten.to.dtype, aten.contiguous.default}
# graph inputs that run along the sequence, and what goes in front of them for the virtual tokens
PADDED_INPUTS = {"attention_mask": aten.new_ones.default, "token_type_ids": aten.new_zeros.default}


def lengthening(ctx) -> list[str]:
    """The names of the context's active adapters that put virtual tokens in front of the input."""
    return [name for name, state in ctx.adapters.items()
            if state.spec.type in KINDS and state.status in ("inserted", "lowered", "quantized")]


def virtual_count(state) -> int:
    """How many virtual tokens an active adapter puts in front (CPT: one per token id it holds)."""
    opts = state.sites[0].options if state.sites else state.spec.options
    return len(opts["cpt_token_ids"]) if state.spec.type == "cpt" else opts["num_virtual_tokens"]


def check_room(ctx, inputs, values: tuple) -> None:
    """InputError, naming the adapters, when a call's sequence leaves no room for the virtual tokens in front
    of it: the graph accepts lengths up to what the model limits (a position table), and with v virtual tokens
    the model sees n + v positions, so n may be at most that limit - v. Nothing to check for a model whose
    sequence length has no limit (rotary positions)."""
    ids = inputs.names[0] if inputs.names else None
    dims = inputs.shapes.get(ids) if ids is not None else None
    if not dims or dims[-1].symbol is None or dims[-1].high is None or values[0] is None:
        return
    active = lengthening(ctx)
    if not active:
        return
    v = sum(virtual_count(ctx.adapters[name]) for name in active)
    length, limit = values[0].shape[-1], dims[-1].high
    if length + v > limit:
        raise InputError(f"input '{ids}' has {length} positions; with the {v} virtual tokens of "
                         f"{', '.join(repr(a) for a in active)} in front the model would see {length + v}, more "
                         f"than the {limit} it takes: give at most {limit - v}")


def refuse_merge(kind: str) -> str:
    return (f"{kind} puts learned virtual tokens in front of the input sequence, not a weight delta; there is "
            "nothing to fold into a base weight")


def _ids_input(embedding: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The graph input the embedding's ids come from, and the nodes on the way (views of it)."""
    path, node = [], embedding.args[1]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        path.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        raise ValueError(f"the embedding {embedding.name} looks up ids that are no graph input (read through "
                         f"{getattr(node, 'name', node)!r}); virtual tokens go in front of the input ids' embedding")
    return node, path


def _size(branch, node: fx.Node, dim: int):
    size = node.meta["val"].shape[dim]
    return size if isinstance(size, int) else branch.op(aten.sym_size.int, node, dim)


def _takes_over(new: fx.Node, old: fx.Node, keep: set[fx.Node]) -> None:
    """Every reader of `old` but `keep` reads `new`; detach puts `old` back."""
    new.meta["surgeon_input_of"] = old.name
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep and user is not new)


def prepend(branch, table: fx.Node, prompt_of, v: int, per_row: bool = False) -> fx.Node:
    """Rewrite the graph around the embedding that reads `table` (see the module docstring).
    `prompt_of(branch)` builds the v x hidden prompt (from the adapter's parameter reads) and is
    called at the embedding, so its nodes come after every parameter read; with `per_row` it builds
    batch x v x hidden, a prompt per row (multitask prompt tuning). Returns `table` (the
    weight itself is unchanged)."""
    graph = branch.graph
    lookups = [u for u in table.users if u.target is aten.embedding.default and u.args[0] is table]
    if not lookups:
        return table   # a read of the table by another op (a tied lm_head): nothing to do here
    if len(lookups) > 1:
        raise ValueError(f"the table is looked up by {len(lookups)} embedding ops; virtual tokens go in front of "
                         "one input embedding")
    (embedding,) = lookups
    ids, path = _ids_input(embedding)
    names = {n.target: n for n in graph.find_nodes(op="placeholder")}
    if "position_ids" in names:
        raise ValueError("the graph takes position_ids: PEFT drops given positions for virtual tokens (they shift "
                         "every real token by v); compile without a position_ids input")
    length = ids.meta["val"].shape[-1]
    if isinstance(length, int):
        raise ValueError(f"the input ids were captured with a static length ({length}): virtual tokens lengthen "
                         "every sequence, which needs a graph with a dynamic sequence length (the default capture)")
    # the virtual tokens, expanded over the batch, in front of the embedding output
    with graph.inserting_before(embedding.next):
        prompt = prompt_of(branch)
        prompt = branch.op(aten.to.dtype, prompt, embedding.meta["val"].dtype)   # as PEFT casts its prompt
        if per_row:   # batch x v x hidden already: a prompt per row (multitask prompt tuning's task prompts)
            wide = prompt
        else:
            batch = _size(branch, embedding, 0)
            wide = branch.op(aten.expand.default, branch.op(aten.unsqueeze.default, prompt, 0), [batch, -1, -1])
        longer = branch.op(aten.cat.default, [wide, embedding], 1)
    _takes_over(longer, embedding, set(branch.created))
    # every length taken from the ids (off their own path to the lookup) becomes n + v
    own = {ids, *path}
    for size in [n for n in graph.find_nodes(op="call_function", target=aten.sym_size.int)
                 if n.args[0] in own and n.args[1] in (-1, len(n.args[0].meta["val"].shape) - 1)]:
        with graph.inserting_before(size.next):
            added = branch.op(operator.add, size, v)
        _takes_over(added, size, set(path) | {embedding})
    for name, fill in PADDED_INPUTS.items():
        if name in names:
            _pad_front(branch, names[name], fill, v)
    # the ids' own views keep n where they took it from another input (GPT-2 views the ids by the mask's length)
    for node in path:
        for stale in [a for a in node.all_input_nodes if a.target is aten.sym_size.int and a.args[0] not in own
                      and a.args[1] in (1, -1)]:
            with graph.inserting_before(node):
                length = branch.op(aten.sym_size.int, ids, ids.meta["val"].dim() - 1)
            length.meta["surgeon_input_of"] = stale.name
            node.replace_input_with(stale, length)
    return table


def _pad_front(branch, placeholder: fx.Node, fill, v: int) -> None:
    """cat([fill(B, v), input], -1) in place of the input (after the fill of an optional one, which takes the ids'
    shape): the mask gets ones in front, the token types zeros, as PEFT pads them for the virtual tokens."""
    graph, node = branch.graph, placeholder
    filled = [u for u in node.users if u.target is fill_input]   # an optional input: filled when not given
    node = filled[0] if len(filled) == 1 and len(node.users) == 1 else node
    start = len(branch.created)
    with graph.inserting_before(node.next if node.op != "placeholder" else _after_inputs(graph)):
        front = branch.op(fill, node, [_size(branch, node, 0), v])
        longer = branch.op(aten.cat.default, [front, node], -1)
    _takes_over(longer, node, set(branch.created[start:]))


def _after_inputs(graph: fx.Graph) -> fx.Node:
    """The node after the graph's last input."""
    return list(graph.find_nodes(op="placeholder"))[-1].next
