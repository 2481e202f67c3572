"""Virtual-token kinds on BERT: PEFT's sequence-classification path (surgeon.adapters.virtual_tokens).

Against PEFT's SEQ_CLS form (PeftModelForSequenceClassification) of a tiny BertForSequenceClassification,
each PEFT kind holding surgeon's tensors: prompt_tuning, p_tuning and multitask_prompt_tuning give PEFT's
logits with and without an attention mask (right padding) and with and without token_type_ids (the virtual
tokens are of type 0); the graph pads the mask and the token types in front. CPT, which PEFT keeps to
CAUSAL_LM, runs surgeon's rewrite on BERT too: at init its prompt is the embedding rows of its tokens, PEFT's
SEQ_CLS prompt tuning holding those rows. PEFT import and export on BertModel (FEATURE_EXTRACTION: a SEQ_CLS
checkpoint also holds the classifier head PEFT trains beside the prompt, which surgeon refuses to import).
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SpecError
from surgeon.inputs import fill_input
from tests.adapters.helpers import NAME, assert_close, spec
from tests.conftest import hf_bert

V, H, TASKS, RANKS, LABELS = 3, 16, 2, 2, 3
TABLE = "bert.embeddings.word_embeddings"   # BERT has three embeddings: the word table is the site
peft = pytest.importorskip("peft")


def bert_classifier(seed: int = 0):
    """tests.conftest's tiny BERT with a 3-label classification head: (model, args, example kwargs). Without
    a mask in the example, the compile captures attention_mask and token_type_ids as optional inputs (filled)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=LABELS)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model, (ids,), {}


def _params(compiled) -> dict[str, torch.nn.Parameter]:
    return {n.rpartition(".")[2]: p for n, p in compiled.module.named_parameters() if f"adapter_{NAME}" in n}


def _load_prompt_tuning(encoder, params):
    encoder.embedding.weight.copy_(params["prompt_embeddings"])


def _load_p_tuning(encoder, params):
    encoder.embedding.weight.copy_(params["prompt_embedding"])
    for index in (0, 2, 4):
        encoder.mlp_head[index].weight.copy_(params[f"mlp_{index}_weight"])
        encoder.mlp_head[index].bias.copy_(params[f"mlp_{index}_bias"])


def _load_multitask(encoder, params):
    """Scales surgeon's task factors by 30 too (in place), so both sides hold the same, larger factors."""
    encoder.embedding.weight.copy_(params["prompt_embeddings"])
    encoder.prefix_task_cols.copy_(params["prefix_task_cols"] * 30)   # N(0, 0.02) factors: make the tasks differ
    encoder.prefix_task_rows.copy_(params["prefix_task_rows"] * 30)
    params["prefix_task_cols"].mul_(30)
    params["prefix_task_rows"].mul_(30)


# kind -> (surgeon options, PEFT config, how PEFT's prompt encoder takes surgeon's tensors)
KINDS = {
    "prompt_tuning": ({}, lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=V),
                      _load_prompt_tuning),
    "p_tuning": ({"encoder_hidden_size": H}, lambda: peft.PromptEncoderConfig(
        task_type="SEQ_CLS", num_virtual_tokens=V, encoder_hidden_size=H), _load_p_tuning),
    "multitask_prompt_tuning": ({"num_tasks": TASKS, "num_ranks": RANKS}, lambda: peft.MultitaskPromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=V, num_tasks=TASKS, num_ranks=RANKS), _load_multitask),
}


def _compile(kind: str, **options):
    model, args, kwargs = bert_classifier()
    options = {"num_virtual_tokens": V, **KINDS[kind][0], **options} if kind in KINDS else options
    return model, args, surgeon.compile(model, args, spec(kind, [TABLE], **options), kwargs)


def _peft_like(kind: str, model, compiled):
    """PEFT's SEQ_CLS model of `kind` on a copy of `model`, holding the compiled adapter's tensors."""
    _, config, load = KINDS[kind]
    wrapped = peft.get_peft_model(copy.deepcopy(model), config()).eval()
    with torch.no_grad():
        load(wrapped.prompt_encoder["default"], _params(compiled))
    return wrapped


def _calls(ids):
    """Keyword sets a BERT caller passes: none, a right-padded mask, token types, both."""
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0   # right padding in row 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1   # a second segment
    return [{}, {"attention_mask": mask}, {"token_type_ids": types}, {"attention_mask": mask, "token_type_ids": types}]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_peft_seq_cls(kind):
    model, args, compiled = _compile(kind)
    assert compiled.report.rows[-1].check == "changes function"
    wrapped = _peft_like(kind, model, compiled)
    ids = args[0]
    tasks = {"task_ids": [1, 0]} if kind == "multitask_prompt_tuning" else {}
    with torch.no_grad():
        for kwargs in _calls(ids):
            peft_tasks = {k: torch.tensor(t) for k, t in tasks.items()}
            want = wrapped(input_ids=ids, **kwargs, **peft_tasks).logits
            got = compiled.module(ids, **kwargs, **tasks).logits
            assert got.shape == want.shape == (ids.shape[0], LABELS)
            assert_close(got, want)
            assert not _close(got, model(ids, **kwargs).logits)   # the prompt matters: the pooler reads it
        # the token types reach the model (a second segment changes the logits)
        typed = compiled.module(ids, token_type_ids=_calls(ids)[2]["token_type_ids"], **tasks).logits
        assert not _close(typed, compiled.module(ids, **tasks).logits)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal within 1e-3 of max |want|: what "the same logits" means for the checks that they differ."""
    return bool((got - want).abs().max() <= 1e-3 * want.abs().max())


def test_graph_pads_mask_and_token_types_in_front():
    model, args, compiled = _compile("prompt_tuning")
    cats = [n for n in compiled.module.graph.nodes if n.meta.get("surgeon_adapter") == NAME
            and "surgeon_input_of" in n.meta and n.target is torch.ops.aten.cat.default]
    # the mask and the token types are optional inputs here: each is padded after its fill
    fronts = {_input_name(n.args[0][1]): n.args[0][0].target for n in cats}
    assert fronts == {"embedding": torch.ops.aten.expand.default, "attention_mask": torch.ops.aten.new_ones.default,
                      "token_type_ids": torch.ops.aten.new_zeros.default}
    compiled.apply([{"remove": {"adapters": [NAME]}}])
    ids = args[0]
    with torch.no_grad():
        for kwargs in _calls(ids):
            assert torch.equal(compiled.module(ids, **kwargs).logits, model(ids, **kwargs).logits)


def test_required_mask_and_token_types_are_padded_too():
    """Compiled with both in the example, the mask and the token types are required graph inputs (no fill)."""
    model, args, _ = bert_classifier()
    given = _calls(args[0])[3]
    compiled = surgeon.compile(model, args, spec("prompt_tuning", [TABLE], num_virtual_tokens=V), given)
    wrapped = _peft_like("prompt_tuning", model, compiled)
    with torch.no_grad():
        assert_close(compiled.module(args[0], **given).logits, wrapped(input_ids=args[0], **given).logits)


def _input_name(node) -> str:
    """The graph input a padded node stands for (through its fill), or the node's own name."""
    node = node.args[0] if node.target is fill_input else node
    return node.target if node.op == "placeholder" else node.name


def test_cpt_on_bert_is_prompt_tuning_of_its_tokens():
    """PEFT has no SEQ_CLS CPT (CPTConfig takes CAUSAL_LM only); surgeon's rewrite is the same on BERT: with
    its offsets at zero the prompt is the tokens' embedding rows, PEFT's SEQ_CLS prompt tuning holding them."""
    tokens = [5, 9, 17, 3]
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        peft.CPTConfig(task_type="SEQ_CLS", cpt_token_ids=tokens)
    model, args, compiled = _compile("cpt", cpt_token_ids=tokens, cpt_tokens_type_mask=[1, 2, 3, 1])
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=len(tokens))).eval()
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.copy_(model.bert.embeddings.word_embeddings.weight[tokens])
        for kwargs in _calls(args[0]):
            assert_close(compiled.module(args[0], **kwargs).logits, wrapped(input_ids=args[0], **kwargs).logits)


def test_peft_import_and_export_on_bert_model(tmp_path):
    """A FEATURE_EXTRACTION checkpoint (BertModel: no head) imports; the export loads back into PEFT told the
    task (surgeon names CAUSAL_LM: an adapter does not know its model's task)."""
    model, args, kwargs = hf_bert()
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=V)).eval()
    wrapped.save_pretrained(tmp_path / "peft")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft"),
                                                           "targets": ["embeddings.word_embeddings"]}]}, kwargs)
    ids, mask = args[0], _calls(args[0])[1]["attention_mask"]
    with torch.no_grad():
        got, want = compiled.module(ids, attention_mask=mask), wrapped(input_ids=ids, attention_mask=mask)
        assert got.last_hidden_state.shape == (ids.shape[0], ids.shape[1] + V, model.config.hidden_size)
        assert_close(got.last_hidden_state, want.last_hidden_state)
        assert_close(got.pooler_output, want.pooler_output)
        next(p for n, p in compiled.module.named_parameters() if n.endswith("prompt_embeddings")).mul_(0.5)
        trained = compiled.module(ids, attention_mask=mask).last_hidden_state
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "export"))
    config.task_type = "FEATURE_EXTRACTION"
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export"), config=config).eval()
    with torch.no_grad():
        assert_close(again(input_ids=ids, attention_mask=mask).last_hidden_state, trained)


def test_seq_cls_checkpoint_is_refused_for_its_classifier(tmp_path):
    model, args, _ = bert_classifier()
    wrapped = peft.get_peft_model(copy.deepcopy(model), KINDS["prompt_tuning"][1]())
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(SpecError, match=r"modules_to_save \['classifier'.*the classifier head PEFT's SEQ_CLS"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path), "targets": [TABLE]}]})


def test_a_sequence_with_no_room_for_the_virtual_tokens_is_refused_naming_them():
    """BERT's position table holds 32 positions; with 3 virtual tokens in front, 29 real ones fit and 30 do not:
    refused before the graph runs, naming the adapter, instead of a size mismatch deep in the graph."""
    model, args, kwargs = bert_classifier()
    compiled = surgeon.compile(model, args, spec("prompt_tuning", targets=[TABLE], num_virtual_tokens=V), kwargs)
    ids = torch.randint(0, 96, (2, 32 - V), generator=torch.Generator().manual_seed(4))
    assert compiled.module(ids)[0].shape == (2, LABELS)
    with pytest.raises(surgeon.InputError, match=rf"input 'input_ids' has 30 positions; with the 3 virtual tokens "
                                                 rf"of '{NAME}' in front the model would see 33, more than the 32 "
                                                 "it takes: give at most 29"):
        compiled.module(torch.cat([ids, ids[:, :1]], 1))
    compiled.apply([{"remove": {"adapters": [NAME]}}])    # no virtual tokens: the whole table again
    assert compiled.module(torch.cat([ids, ids[:, :1], ids[:, :2]], 1))[0].shape == (2, LABELS)
