"""gift.app.results: eval.json, written atomically into a folder made for it, refused naming a file in the way."""
import json

import pytest

from gift.app.errors import UsageError
from gift.app.results import EVAL_JSON, write_eval_json


def test_eval_json_is_written_into_its_folder_and_a_file_in_the_way_is_named(tmp_path):
    result = {"top1": 0.5, "top5": 1.0, "split": "test", "method": "gift"}
    write_eval_json(str(tmp_path / "run" / EVAL_JSON), result)
    assert json.loads((tmp_path / "run" / EVAL_JSON).read_text()) == result
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [EVAL_JSON]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        write_eval_json(str(tmp_path / "afile" / EVAL_JSON), result)
