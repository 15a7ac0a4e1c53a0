"""Bad ``layers`` and ``batch_size`` arguments to the core verbs raise the module's own error,
naming the argument, what was wrong and what is valid, before any work is done (they used to
surface as IndexError, ValueError or TypeError from deep inside, or pass silently)."""

import re

import pytest

import icl_probe as ip


def _call(fn, model, **kwargs):
    pair = ip.build_prompt(model, "capital", query=0, k=2)
    if fn == "trace":
        return ip.trace(model, [pair], **kwargs)
    if fn == "implied_updates":
        return ip.implied_updates(model, [pair], **kwargs)
    if fn == "verify_identities":
        return ip.verify_identities(model, [pair], **kwargs)
    return ip.update_trajectory(model, "capital", query=0, k=2, **kwargs)


ERROR = {"trace": ip.TraceError, "implied_updates": ip.ProbeError,
         "verify_identities": ip.ProbeError, "update_trajectory": ip.ProbeError}
VALID = r"the model's layers are 0\.\.2"  # tiny64 has 3 layers


@pytest.mark.parametrize("fn", list(ERROR))
@pytest.mark.parametrize("layers, message", [
    pytest.param([99], r"layer 99 is out of range; " + VALID, id="too-large"),
    pytest.param([0, -1], r"layer -1 is out of range; " + VALID, id="negative"),
    pytest.param([1.5], r"layer 1\.5 is not an integer; " + VALID, id="float"),
    pytest.param(["a"], r"layer 'a' is not an integer; " + VALID, id="str"),
    pytest.param(2, r"expected a list of layer indices, e\.g\. layers=\[2\]", id="bare-int"),
    pytest.param([], r"no layers given; " + VALID, id="empty"),
])
def test_bad_layers_are_named_with_the_valid_range(tiny64, fn, layers, message):
    with pytest.raises(ERROR[fn], match=re.escape(f"{fn}(layers=") + ".*" + message):
        _call(fn, tiny64, layers=layers)


@pytest.mark.parametrize("fn", ["trace", "implied_updates", "update_trajectory"])
@pytest.mark.parametrize("batch_size", [0, -2, 1.5])
def test_bad_batch_size_is_named(tiny64, fn, batch_size):
    with pytest.raises(ERROR[fn], match=re.escape(f"{fn}(batch_size={batch_size!r}): ") +
                       "batch_size .* must be a positive integer"):
        _call(fn, tiny64, batch_size=batch_size)


def test_model_space_layers_must_be_traced(tiny64):
    with pytest.raises(ip.ProbeError, match=r"model_space=\[2\]\): layers \[2\] are not among "
                                            r"the traced layers \[0\]"):
        _call("implied_updates", tiny64, layers=[0], model_space=[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=[99]), r"layer 99 is out of range"),
    (dict(batch_size=0), r"batch_size=0"),
    (dict(prefix_what=("scores",)), r"\['scores'\] are not key-side quantities"),
])
def test_shared_prefix_trace_checks_its_arguments(kwargs, match):
    from icl_probe.hooks import trace_shared_prefix

    model = ip.tiny_model(seed=2)
    pairs = ip.build_prompts(model, "capital", range(3), k=3)
    with pytest.raises(ip.TraceError, match=match):
        trace_shared_prefix(model, pairs, **kwargs)
