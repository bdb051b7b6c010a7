import torch

from genq_core.data import repeat_in_turn


def test_repeat_in_turn_cycles_the_rows_up_to_the_count() -> None:
    images = torch.arange(3.0).reshape(3, 1)
    assert repeat_in_turn(images, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_repeat_in_turn_keeps_each_row_once_when_the_count_is_smaller() -> None:
    images = torch.arange(5.0)
    assert repeat_in_turn(images, 3).tolist() == [0, 1, 2, 3, 4]
