"""BARS/FuxiCTR split CSVs (train.csv, valid.csv, test.csv) of TaobaoAd_x1, KuaiVideo_x1 and
AmazonElectronics_x1, with the columns written by the reczoo/BARS conversion scripts
(datasets/Taobao/TaobaoAd_x1/convert_taobaoad_x1.py, datasets/KuaiShou/KuaiVideo_x1/
convert_kuaivideo_x1.py, datasets/Amazon/AmazonElectronics_x1/convert_amazonelectronics_x1.py).

TaobaoAd_x1 and AmazonElectronics_x1 carry no time: file order then row order is time order.
KuaiVideo_x1's timestamp only orders events (its absolute time was removed). Either way the
order is spread over `--days` days. The precomputed history columns (`*_his`, `*_history`,
`pos_items`, `neg_items`) are not read: the pipeline builds histories from the clicks itself.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loopfm.data.importers.canonical import DataFormatError
from loopfm.data.importers.mapped import read_mapped

SPLITS = ("train.csv", "valid.csv", "test.csv")
ROLE_MAPS = {
    "bars-taobao": {
        "user_id": "userid", "item_id": "adgroup_id", "label": "clk", "category": "cate_id", "brand": "brand",
        "price": "price", "age_level": "age_level", "gender": "final_gender_code",
    },
    "bars-kuaivideo": {"user_id": "user_id", "item_id": "item_id", "label": "is_click", "order": "timestamp"},
    "bars-amazon": {"user_id": "user_id", "item_id": "item_id", "label": "label", "category": "cate_id"},
}  # fmt: skip


def read_bars(folder: Path, fmt: str) -> pd.DataFrame:
    files = [folder / name for name in SPLITS if (folder / name).is_file()]
    if not files:
        raise DataFormatError(f"{folder}: none of {', '.join(SPLITS)} found (the BARS/FuxiCTR split files)")
    return read_mapped(files, ROLE_MAPS[fmt], integer_ids=True)
