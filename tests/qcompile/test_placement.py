"""The decision `placement=measured` takes from its measurements (the timings themselves are machine noise)."""
import pytest
from helpers import parse

from qcompile import placement
from qcompile.decisions import FLOAT_ISLANDS_KEY
from qcompile.placement import Timing, choose_placement

# Two quantized Convs, as lowering leaves them
TWO_CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1, 4, 4] x) => (float[N, 1, 4, 4] y) <int8[1, 1, 1, 1] w = {2}, float s = {1}> {
    weight = DequantizeLinear(w, s)
    c = Conv(x, weight)
    y = Conv(c, weight)
}
"""


ACCURATE, INACCURATE = 30.0, 8.0  # dB, either side of MIN_SQNR_DB


@pytest.fixture
def timings(monkeypatch):
    """time_against_fp32 answers from a queue: one list of timings per call; sqnr_against_fp32 with the
    integer model's SQNR in the next answer."""
    answers = []
    monkeypatch.setattr(placement, "time_against_fp32", lambda reference, models, data, target: answers.pop(0))
    monkeypatch.setattr(placement, "sqnr_against_fp32", lambda reference, model, data, target: answers[0][0].sqnr_db)
    return answers


def _islands(count, text=TWO_CONVS):
    model = parse(text)
    model.meta[FLOAT_ISLANDS_KEY] = count
    return model, "islands"


def _choose(timings, answers, islands=1, islands_text=TWO_CONVS):
    timings.extend(answers)
    compiled = []
    integer = parse(TWO_CONVS)
    integer.meta[FLOAT_ISLANDS_KEY] = islands
    chosen, note = choose_placement("in.onnx", (integer, "integer"),
                                    lambda: compiled.append(1) or _islands(islands, islands_text), None, None)
    return chosen[1], note, bool(compiled)


def test_a_model_no_slower_than_fp32_keeps_every_conv_on_integers_and_compiles_once(timings):
    kept, note, compiled_again = _choose(timings, [[Timing({1: 0.8, 8: 1.03}, 5.0, ACCURATE)]])
    assert kept == "integer" and not compiled_again and "0.80x / 1.03x fp32 at batch 1 / 8" in note


def test_a_model_too_quick_to_time_is_placed_by_the_op_rules(timings):
    kept, note, compiled_again = _choose(timings, [[Timing({1: 1.5}, 0.2, ACCURATE)]])
    assert kept == "integer" and not compiled_again and "too quick" in note


def test_float_islands_are_kept_only_where_they_win_by_more_than_the_noise(timings):
    slower = Timing({1: 1.3, 8: 1.2}, 5.0, ACCURATE)
    kept, note, _ = _choose(timings, [[slower], [slower, Timing({1: 0.95, 8: 1.0}, 5.0, ACCURATE)]])
    assert kept == "islands" and "the 1 Convs" in note and "kept float: faster" in note and "still" not in note

    kept, note, _ = _choose(timings, [[slower], [slower, Timing({1: 1.28, 8: 1.25}, 5.0, ACCURATE)]])
    assert kept == "integer" and "no faster" in note and "still 1.30x fp32 at worst" in note

    # slower at first, not when timed again beside the float islands: the smaller model stays
    again = [Timing({1: 0.95, 8: 1.0}, 5.0, ACCURATE), Timing({1: 0.8, 8: 0.8}, 5.0, ACCURATE)]
    kept, note, _ = _choose(timings, [[slower], again])
    assert kept == "integer" and "kept on integers: no slower" in note and "still" not in note


def test_a_model_with_no_conv_to_leave_float_or_too_few_is_not_timed(timings, monkeypatch):
    kept, note, compiled_again = _choose(timings, [], islands=0)
    assert kept == "integer" and not compiled_again and "nothing to time" in note

    monkeypatch.setattr(placement, "MIN_ISLAND_SHARE", 0.6)  # one of the two Convs is too few
    kept, note, compiled_again = _choose(timings, [], islands=1)
    assert kept == "integer" and not compiled_again and "1 of 2 Convs" in note and "not timed" in note


def test_float_islands_are_tried_where_the_integer_model_is_inaccurate_and_kept_where_they_gain_at_no_more_than_fp32(
        timings):
    fast_but_wrong = Timing({1: 0.5, 8: 0.7}, 5.0, INACCURATE)
    kept, note, compiled_again = _choose(timings, [[fast_but_wrong, Timing({1: 0.9, 8: 1.0}, 5.0, 25.0)]])
    assert kept == "islands" and compiled_again and "more accurate" in note and "8.0 dB" in note and "25.0 dB" in note
    assert not timings  # the integer model was timed once, beside the islands

    # not where the gain is within MIN_GAIN_DB, nor where the islands would be slower than fp32
    kept, _, _ = _choose(timings, [[fast_but_wrong, Timing({1: 0.9, 8: 1.0}, 5.0, 10.0)]])
    assert kept == "integer"
    kept, note, _ = _choose(timings, [[fast_but_wrong, Timing({1: 1.2, 8: 1.1}, 5.0, 25.0)]])
    assert kept == "integer" and "kept on integers: no slower than fp32" in note

    # nor where they leave no weight quantized: that is the fp32 model
    all_float = TWO_CONVS.replace("int8[1, 1, 1, 1] w", "float[1, 1, 1, 1] w")
    all_float = all_float.replace("weight = DequantizeLinear(w, s)", "weight = Identity(w)")
    kept, _, _ = _choose(timings, [[fast_but_wrong, Timing({1: 0.9, 8: 1.0}, 5.0, 90.0)]], islands_text=all_float)
    assert kept == "integer"


def test_more_accurate_float_islands_slower_than_fp32_by_about_the_noise_are_timed_again_and_averaged(timings):
    fast_but_wrong = Timing({1: 0.5, 8: 0.7}, 5.0, INACCURATE)
    close = Timing({1: 1.07, 8: 0.97}, 5.0, 35.0)
    kept, note, _ = _choose(timings, [[fast_but_wrong, close], [fast_but_wrong, Timing({1: 0.99, 8: 0.95}, 5.0, 35.0)]])
    assert kept == "islands" and not timings and "1.03x / 0.96x" in note  # the averages

    kept, _, _ = _choose(timings, [[fast_but_wrong, close], [fast_but_wrong, Timing({1: 1.09, 8: 0.97}, 5.0, 35.0)]])
    assert kept == "integer" and not timings

    kept, _, _ = _choose(timings, [[fast_but_wrong, Timing({1: 1.2, 8: 0.97}, 5.0, 35.0)]])  # too far: once
    assert kept == "integer" and not timings
