"""The decision `placement=measured` takes from its measurements (the timings themselves are machine noise)."""
import time

import pytest
from helpers import parse

from qcompile import placement
from qcompile.decisions import FLOAT_ISLANDS_KEY
from qcompile.placement import Timing, choose_placement
from qcompile.verify import interleaved_medians

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
    """The bench answers from a queue: its timings, one list per call; its SQNR, the integer model's in the
    next answer; the costliest roundings' readers and how many roundings that leaves, as a test sets them;
    the SQNRs the last timing was given."""
    class Answers(list):
        costliest = ([], 0)  # no sensitive-float candidate

    answers = Answers()

    class Bench:
        def __init__(self, reference, inputs, data, target, folder):
            pass

        def sqnr(self, model):
            return answers[0][0].sqnr_db

        def costliest_roundings(self, model):
            return answers.costliest

        def time(self, models, sqnrs=None):
            answers.sqnrs_given = sqnrs
            return answers.pop(0)

    monkeypatch.setattr(placement, "Bench", Bench)
    return answers


# The same as `placement=float` leaves them: in float, weights stored INT8 (or float32, with float_weights=float32)
FLOAT_INT8_WEIGHTS = TWO_CONVS.replace("weight = DequantizeLinear(w, s)",
                                      "wf = Cast <to = 1> (w)\n    weight = Mul(wf, s)")
FLOAT32_WEIGHTS = TWO_CONVS.replace("int8[1, 1, 1, 1] w", "float[1, 1, 1, 1] w").replace(
    "weight = DequantizeLinear(w, s)", "weight = Identity(w)")


def _choose(timings, answers, islands=1, islands_text=TWO_CONVS, float_text=FLOAT_INT8_WEIGHTS):
    """The placement kept, its note, and the placements compiled besides integer."""
    timings.extend(answers)
    compiled = []

    def compile_as(name, exclude):
        compiled.append(name if not exclude else (name, exclude))
        model = parse(islands_text if name == "float-islands" else float_text)
        model.meta[FLOAT_ISLANDS_KEY] = islands
        return model, name

    integer = parse(TWO_CONVS)
    integer.meta[FLOAT_ISLANDS_KEY] = islands
    chosen, note = choose_placement("in.onnx", (integer, "integer"), compile_as, None, None)
    return chosen[1], note, compiled


def _timing(ratio_1, ratio_8, sqnr_db):
    return Timing({1: ratio_1, 8: ratio_8}, 5.0, sqnr_db)


SLOWER = _timing(1.3, 1.2, ACCURATE)
FAST_BUT_WRONG = _timing(0.5, 0.7, INACCURATE)


def test_a_model_no_slower_than_fp32_keeps_every_conv_on_integers_and_compiles_once(timings):
    kept, note, compiled = _choose(timings, [[_timing(0.8, 1.03, ACCURATE)]])
    assert kept == "integer" and not compiled and "0.80x / 1.03x fp32 at batch 1 / 8" in note


def test_a_model_too_quick_to_time_is_placed_by_accuracy(timings):
    kept, note, compiled = _choose(timings, [[Timing({1: 1.5}, 0.2, ACCURATE)]])
    assert kept == "integer" and not compiled and "too quick" in note

    answers = [Timing({1: 1.5}, 0.2, INACCURATE), Timing({1: 1.2}, 0.2, 25.0), Timing({1: 0.9}, 0.2, 40.0)]
    kept, note, compiled = _choose(timings, [answers])
    assert kept == "float" and compiled == ["float-islands", "float"] and "too quick" in note
    assert "integer 8.0 dB, float-islands 25.0 dB, float 40.0 dB: kept float, the most accurate" in note


def test_a_slower_model_gets_the_fastest_placement_no_slower_than_fp32_preferring_integers_within_the_noise(timings):
    kept, note, compiled = _choose(timings, [[SLOWER], [SLOWER, _timing(0.95, 0.97, ACCURATE),
                                                        _timing(1.0, 0.98, ACCURATE)]])
    assert kept == "float-islands" and compiled == ["float-islands", "float"]
    assert "the 1 Convs with float ops after them left float (float-islands) 0.95x / 0.97x" in note
    assert "every layer in float, weights stored INT8 where the outputs bear it (float) 1.00x / 0.98x" in note
    assert "kept float-islands, the fastest at 20 dB" in note and "still" not in note

    kept, note, _ = _choose(timings, [[SLOWER], [SLOWER, _timing(1.28, 1.25, ACCURATE), _timing(1.01, 1.0, ACCURATE)]])
    assert kept == "float" and "kept float," in note

    # slower at first, not when timed again beside the others: the integer model stays
    kept, note, _ = _choose(timings, [[SLOWER], [_timing(0.95, 0.95, ACCURATE), _timing(0.93, 0.9, ACCURATE),
                                                 _timing(1.0, 1.0, ACCURATE)]])
    assert kept == "integer" and "still" not in note


def test_where_every_placement_is_slower_than_fp32_the_fastest_is_kept_and_the_note_says_so(timings):
    kept, note, _ = _choose(timings, [[SLOWER], [SLOWER, _timing(1.28, 1.25, ACCURATE)]], float_text=FLOAT32_WEIGHTS)
    assert kept == "integer" and "kept integer, the fastest of the most accurate; still 1.30x fp32 at worst" in note
    assert "(float)" not in note  # with float32 weights that is the fp32 model, not a candidate


def test_a_model_with_no_conv_to_leave_float_too_few_or_all_tries_the_float_placement_alone(timings, monkeypatch):
    kept, note, compiled = _choose(timings, [[_timing(0.8, 0.8, ACCURATE)]], islands=0)
    assert kept == "integer" and not compiled and "every Conv on integers 0.80x / 0.80x" in note

    kept, note, compiled = _choose(timings, [[SLOWER], [SLOWER, _timing(1.0, 0.99, ACCURATE)]], islands=0)
    assert kept == "float" and compiled == ["float"]

    monkeypatch.setattr(placement, "MIN_ISLAND_SHARE", 0.6)  # one of the two Convs is too few
    kept, note, compiled = _choose(timings, [[FAST_BUT_WRONG, _timing(1.0, 1.01, ACCURATE)]], islands=1)
    assert kept == "float" and compiled == ["float"]

    # float islands at both Convs would leave no layer on integers: that is the float placement
    monkeypatch.setattr(placement, "MIN_ISLAND_SHARE", 0.25)
    kept, note, compiled = _choose(timings, [[FAST_BUT_WRONG, _timing(1.0, 1.01, ACCURATE)]], islands=2)
    assert kept == "float" and compiled == ["float"]


def test_an_inaccurate_model_gets_the_fastest_placement_at_20_db_else_the_most_accurate_no_slower_than_fp32(
        timings):
    kept, note, compiled = _choose(timings, [[FAST_BUT_WRONG, _timing(0.9, 1.0, 25.0), _timing(1.0, 1.0, 40.0)]])
    assert kept == "float-islands" and "8.0 dB" in note and "25.0 dB" in note and "40.0 dB" in note
    assert not timings  # the integer model was timed once, beside the others

    # under 20 dB everywhere: the fastest of those within MIN_GAIN_DB of the most accurate
    kept, _, _ = _choose(timings, [[FAST_BUT_WRONG, _timing(0.9, 1.0, 10.0), _timing(1.0, 1.0, 12.0)]])
    assert kept == "float-islands"
    kept, note, _ = _choose(timings, [[FAST_BUT_WRONG, _timing(0.9, 1.0, 10.0), _timing(1.0, 1.0, 16.0)]])
    assert kept == "float" and "the most accurate no slower than fp32" in note
    kept, _, _ = _choose(timings, [[FAST_BUT_WRONG, _timing(1.2, 1.1, 25.0), _timing(1.2, 1.1, 25.0)]])
    assert kept == "integer"

    # islands that leave no weight quantized are the fp32 model
    kept, note, compiled = _choose(timings, [[FAST_BUT_WRONG]], islands_text=FLOAT32_WEIGHTS,
                                   float_text=FLOAT32_WEIGHTS)
    assert kept == "integer" and compiled == ["float-islands", "float"] and "(float" not in note


def test_an_inaccurate_model_is_compiled_again_with_the_readers_of_its_costliest_roundings_left_float(timings):
    timings.costliest = (["/block[0]/conv"], 3)
    others = [_timing(0.9, 1.0, 30.0), _timing(1.0, 1.0, 35.0)]
    sensitive = _timing(0.7, 0.8, 24.0)
    kept, note, compiled = _choose(timings, [[FAST_BUT_WRONG, *others], [FAST_BUT_WRONG, *others, sensitive]])
    assert compiled == ["float-islands", "float", ("integer", ("/block[[]0]/conv",))]  # a literal fnmatch pattern
    assert kept == "integer" and "kept sensitive-float, the fastest at 20 dB" in note and not timings
    assert timings.sqnrs_given == [INACCURATE, 30.0, 35.0, INACCURATE]  # each measured once, not again

    # no faster than the others beyond the noise: they leave more float, and are kept
    timings.costliest = (["/block[0]/conv"], 3)
    kept, note, _ = _choose(timings, [[FAST_BUT_WRONG, *others], [FAST_BUT_WRONG, *others, _timing(0.92, 1.0, 24.0)]])
    assert kept == "float-islands" and "sensitive-float" in note
    assert "the 1 layers reading the activations whose rounding costs the outputs most left float" in note

    # leaving them float would leave no rounding: that is the float placement, not compiled twice
    timings.costliest = (["/block[0]/conv"], 0)
    _, _, compiled = _choose(timings, [[FAST_BUT_WRONG, *others]])
    assert compiled == ["float-islands", "float"] and not timings

    # on integers not well faster than the accurate candidates: little to win, and not tried
    timings.costliest = (["/block[0]/conv"], 3)
    kept, _, compiled = _choose(timings, [[_timing(0.85, 0.85, INACCURATE), *others]])
    assert compiled == ["float-islands", "float"] and kept == "float-islands" and not timings


def test_a_more_accurate_candidate_slower_than_fp32_by_about_the_noise_is_timed_again_and_averaged(timings):
    close = _timing(1.07, 0.97, 35.0)

    def choose(second):
        return _choose(timings, [[FAST_BUT_WRONG, close], [FAST_BUT_WRONG, second]], float_text=FLOAT32_WEIGHTS)

    kept, note, _ = choose(_timing(0.99, 0.95, 35.0))
    assert kept == "float-islands" and not timings and "1.03x / 0.96x" in note  # the averages

    # still slower on average, by no more than the noise: accuracy first, and the note says so
    kept, note, _ = choose(_timing(1.09, 0.97, 35.0))
    assert kept == "float-islands" and not timings and "still 1.08x fp32 at worst" in note

    kept, _, _ = _choose(timings, [[FAST_BUT_WRONG, _timing(1.2, 0.97, 35.0)]], float_text=FLOAT32_WEIGHTS)
    assert kept == "integer" and not timings  # too far: timed once


def test_sqnr_is_measured_on_the_first_calibration_samples_not_only_the_first(tmp_path):
    """A fixed batch of 1: each batch is one sample. The first is within the clip; the next seven are not."""
    import numpy as np

    from qcompile.calibration import CalibrationData
    from qcompile.data import model_inputs
    from qcompile.io import save_model
    from qcompile.targets import get_target

    reference = tmp_path / "reference.onnx"
    save_model(parse('<ir_version: 8, opset_import: ["" : 17]> g (float[1, 4] x) => (float[1, 4] y) '
                     '{ y = Identity(x) }'), reference)
    clipped = parse('<ir_version: 8, opset_import: ["" : 17]> g (float[1, 4] x) => (float[1, 4] y) '
                    '<float lo = {-1}, float hi = {1}> { y = Clip(x, lo, hi) }')
    samples = np.full((placement.SQNR_SAMPLES + 4, 1, 4), 2.0, np.float32)
    samples[0] = 0.5
    np.savez(tmp_path / "calib.npz", x=samples)

    bench = placement.Bench(reference, model_inputs(clipped), CalibrationData(str(tmp_path / "calib.npz")),
                            get_target("ort-cpu"), tmp_path)
    sqnr = bench.sqnr(clipped)

    # 7 of 8 samples lose half their value: noise 7 * 4 * 1, signal 4 * 0.25 + 7 * 4 * 4
    assert sqnr == pytest.approx(10 * np.log10((1 + 7 * 4 * 4) / (7 * 4)), abs=0.01)


class _Sleeper:
    def __init__(self, seconds):
        self.seconds = seconds

    def run(self, names, feed):
        time.sleep(self.seconds)


def test_one_model_against_fp32_is_timed_no_further_once_it_is_clearly_faster_or_slower():
    for candidate in (0.001, 0.008):
        _, rounds = interleaved_medians([_Sleeper(0.004), _Sleeper(candidate)], [], {}, placement.ROUNDS,
                                        placement.SECONDS, settled=placement._clear)
        assert rounds == placement.SETTLE_ROUNDS

    _, rounds = interleaved_medians([_Sleeper(0.004), _Sleeper(0.004)], [], {}, placement.ROUNDS, 0.0,
                                    settled=placement._clear)
    assert rounds == placement.ROUNDS  # within the noise: timed as long as ever
