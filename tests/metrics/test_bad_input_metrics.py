"""Bad input to the identity check and `python -m refalign_core eval`: one clear error each, before any output
(`bad_input.py`)."""

import math

import torch

from refalign_core.errors import RefAlignInputError
from refalign_core.metrics.eval import main as eval_cli
from refalign_core.metrics.identity import check_identity

from bad_input import Case, api, command, table_test

CASES = [
    # identity check
    Case("identity names as text", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                   torch.rand(3, 32, 32, 3), None, names="ab")),
         RefAlignInputError, "names"),
    Case("identity names short", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                 torch.rand(3, 32, 32, 3), None, names=["a"])),
         RefAlignInputError, "names"),
    Case("identity masks short", api(lambda i, o: check_identity([torch.rand(32, 32, 3)] * 2,
                                                                 torch.rand(3, 32, 32, 3), None, masks=[None])),
         RefAlignInputError, "masks"),
    Case("identity NaN frames", api(lambda i, o: check_identity([torch.rand(32, 32, 3)],
                                                                torch.full((3, 32, 32, 3), math.nan), None)),
         RefAlignInputError, "NaN"),
    Case("identity one [H,W,3] reference", api(lambda i, o: check_identity(torch.rand(32, 32, 3),
                                                                           torch.rand(3, 32, 32, 3), None)),
         RefAlignInputError, "references"),
    # evaluation
    *[Case(f"eval cases {name}", command("--cases", f"{{i}}/cases/{name}.json", "--videos", "{i}", "--out", "{o}/r",
                                         run=eval_cli), 2, needle)
      for name, needle in [("notjson", "not a readable JSON"), ("number", "list of cases"), ("escape", "id"),
                           ("twice", "used twice"), ("names_text", "names"), ("masks_short", "masks"),
                           ("five", "1–4"), ("ref_outside", "points outside")]],
    Case("eval videos missing", command("--cases", "{i}/cases/ok.json", "--videos", "{i}/none", "--out", "{o}/r",
                                        run=eval_cli), 2, "--videos"),
    Case("eval out under a file", command("--cases", "{i}/cases/ok.json", "--videos", "{i}", "--out",
                                          "{i}/a_file/r", run=eval_cli), 2, "a_file"),
]


test_bad_input_is_one_clear_error_before_any_output = table_test(CASES, 6)
