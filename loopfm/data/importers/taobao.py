"""TaobaoAd raw files (Alibaba, Tianchi dataset 56): raw_sample.csv (the ad impressions and
clicks), ad_feature.csv, user_profile.csv and, if present, behavior_log.csv.

Behaviour-log rows (page views, carts, favourites, buys: no ad, no impression) become
events of their own vertical `behavior` on a pseudo-item per (category, brand), labelled 1:
the FM learns from them and logs their codes into the users' histories, the VM never trains
on them (the LoopFM setting: the FM sees more than the VM). Only the users of raw_sample.csv
are kept. The full log has 700M rows; filter it (e.g. by user) before importing on a laptop.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loopfm.data.importers.canonical import TEXT, convert, one_row_per_id, read_table

BEHAVIOR_VERTICAL = "behavior"
RAW = {"user_id": "user", "item_id": "adgroup_id", "label": "clk", "timestamp": "time_stamp"}
ADS = {"item_id": "adgroup_id", "category": "cate_id", "brand": "brand", "price": "price"}
PROFILE = {"user_id": "userid", "age_level": "age_level", "gender": "final_gender_code"}
BEHAVIOR = {"user_id": "user", "timestamp": "time_stamp", "category": "cate", "brand": "brand"}


def read_taobao(folder: Path) -> pd.DataFrame:
    raw = convert(read_table(folder / "raw_sample.csv", ["pid", *RAW.values()]), RAW, integer_ids=True, time_unit="s")
    ads = convert(read_table(folder / "ad_feature.csv", list(ADS.values())), ADS, integer_ids=True)
    profile = convert(read_table(folder / "user_profile.csv", list(PROFILE.values())), PROFILE, integer_ids=True)
    events = raw.merge(one_row_per_id(ads.drop(columns="adgroup_id"), "_item"), on="_item", how="left")
    behavior_path = folder / "behavior_log.csv"
    if behavior_path.is_file():
        log = convert(read_table(behavior_path, ["btag", *BEHAVIOR.values()]), BEHAVIOR, integer_ids=True, time_unit="s")
        log = log[log["_user"].isin(raw["_user"])]
        pseudo_item = ("behavior:" + log["_category"].astype(str) + ":" + log["_brand"].astype(str)).astype(TEXT)
        events = pd.concat([events, log.assign(_item=pseudo_item, _label=1, _vertical=BEHAVIOR_VERTICAL)], ignore_index=True)
    return events.merge(one_row_per_id(profile, "_user"), on="_user", how="left")
