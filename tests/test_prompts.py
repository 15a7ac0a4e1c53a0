"""Prompt building: the zero-shot suffix property, exact spans, sampling options, bad input."""


import pytest
import torch

import icl_probe as ip


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model()


def test_zs_ids_are_the_suffix_and_spans_are_exact(tiny):
    task = ip.load_task("capital")
    pair = ip.build_prompt(tiny, task, query=5, k=4, seed=3)
    tok = tiny.tokenizer
    assert pair.icl_ids[0] == tok.bos_token_id == pair.zs_ids[0]  # tiny model uses BOS
    assert torch.equal(pair.icl_ids[-(len(pair.zs_ids) - 1):], pair.zs_ids[1:])
    s = pair.spans
    assert s.bos.start == 0 and s.pred == len(pair.icl_ids) - 1 == s.query.stop - 1
    # spans tile the prompt: bos, then demo input/label/sep, ..., then the query
    cursor = 1
    for d, i, y in zip(s.demos, pair.demos, pair.demo_labels):
        assert d.input.start == cursor and d.label.start == d.input.stop
        assert d.sep.start == d.label.stop
        cursor = d.sep.stop
        assert tok.decode(pair.icl_ids[d.input.slice]) == f"Input: {task.items[i].x}\nOutput:"
        assert tok.decode(pair.icl_ids[d.label.slice]) == f" {y}"
        assert tok.decode(pair.icl_ids[d.sep.slice]) == "\n\n"
    assert s.query.start == cursor
    assert tok.decode(pair.icl_ids[s.query.slice]) == f"Input: {task.items[5].x}\nOutput:"
    assert pair.zs_spans.pred == len(pair.zs_ids) - 1
    assert torch.equal(pair.zs_ids[pair.zs_spans.query.slice], pair.icl_ids[s.query.slice])
    assert torch.equal(s.query_indices(), torch.cat([torch.tensor([0]), s.query.indices()]))
    assert len(s.demo_indices()) == sum(len(d.whole) for d in s.demos)
    assert 5 not in pair.demos and len(set(pair.demos)) == 4


def test_seed_order_shuffle_and_balance(embedded):
    tiny = embedded  # topic's labels need a real tokenizer (distinct first tokens)
    task = ip.load_task("topic")
    a = ip.build_prompt(tiny, task, query=0, k=8, seed=1, prepend_bos=False)
    b = ip.build_prompt(tiny, task, query=0, k=8, seed=1, prepend_bos=False)
    c = ip.build_prompt(tiny, task, query=0, k=8, seed=2, prepend_bos=False)
    assert a.demos == b.demos and a.demos != c.demos and torch.equal(a.icl_ids, b.icl_ids)
    rev = ip.build_prompt(tiny, task, query=0, k=8, seed=1, order=range(7, -1, -1),
                          prepend_bos=False)
    assert rev.demos == a.demos[::-1]
    shuf = ip.build_prompt(tiny, task, query=0, k=8, seed=1, shuffle_labels=True,
                           prepend_bos=False)
    assert shuf.demos == a.demos and sorted(shuf.demo_labels) == sorted(a.demo_labels)
    assert shuf.demo_labels != a.demo_labels
    bal = ip.build_prompt(tiny, task, query=0, k=8, seed=4, balanced=True, prepend_bos=False)
    assert sorted(bal.demo_labels) == sorted(["world", "sports", "business", "science"] * 2)
    with pytest.raises(ip.PromptError, match="permutation"):
        ip.build_prompt(tiny, task, query=0, k=3, order=[0, 0, 1])


def test_classification_labels_sharing_a_first_token_is_an_error(tiny):
    # the byte tokenizer starts every " label" with the same space byte
    with pytest.raises(ip.PromptError, match="share their first token"):
        ip.build_prompt(tiny, "sentiment", query=0, k=2)


def test_prompt_longer_than_the_context(tmp_path):
    small = ip.tiny_model(n_ctx=64)
    with pytest.raises(ip.PromptError, match="context holds 64"):
        ip.build_prompt(small, "capital", query=0, k=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=10_000), "has items"),
    (dict(k=-1), "k must be"),
    (dict(k=500), "use a smaller k"),
    (dict(demos=[0, 1], query=1), "among its own demos"),
])
def test_bad_prompt_requests(tiny, kwargs, match):
    args = dict(query=0, k=2) | kwargs
    with pytest.raises(ip.PromptError, match=match):
        ip.build_prompt(tiny, "capital", **args)


def test_embedded_zs_suffix_and_label_tokens(embedded):
    for name in ip.shipped_tasks():
        pair = ip.build_prompt(embedded, name, query=1, k=4, seed=0)
        bos = embedded.tokenizer.bos_token_id
        assert pair.icl_ids[0] == bos == pair.zs_ids[0] and pair.spans.bos.stop == 1
        assert torch.equal(pair.icl_ids[-(len(pair.zs_ids) - 1):], pair.zs_ids[1:])
        assert bos not in pair.icl_ids[1:].tolist()
        gold = ip.load_task(name).items[1].y
        first = embedded.tokenizer(" " + gold, add_special_tokens=False).input_ids[0]
        assert pair.target_id == first
        # first tokens are distinct candidates, or the task is scored by whole answers
        distinct = len(set(pair.label_ids.tolist())) == len(pair.label_ids)
        assert distinct == (pair.scoring == "first_token")
        assert len(pair.labels) == len(ip.load_task(name).answers)  # no answer merged
