"""Importers: small fixture files written here in each dataset's exact layout (no downloads),
the canonical tables they become, the vertical rule, and bad files named by file, column, row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loopfm.core.config import ConfigError, RunConfig
from loopfm.data.vocab import Vocab
from loopfm.data.importers import ImportOptions, configure, import_data
from loopfm.data.importers.canonical import DataFormatError, VerticalRule
from loopfm.data.importers.mapped import parse_map
from conftest import loopfm, refusal

DAY = 86_400
T0 = 1494032110  # 2017-05-06 00:55:10 UTC, TaobaoAd's first day (its README's example time)


def write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def imported(path: Path, fmt: str, rule: str, **options):
    return import_data(path, ImportOptions(fmt, VerticalRule.parse(rule), **options))


def source_ids(tables: dict, kind: str) -> pd.Series:
    """Dense id -> source id."""
    return tables[f"{kind}_ids"].set_index(f"{kind}_id")["source_id"]


def taobao_files(folder: Path, behaviors: bool = True) -> Path:
    write(folder / "raw_sample.csv", [
        "user,time_stamp,adgroup_id,pid,nonclk,clk",
        f"581738,{T0 + 2 * DAY},1,430548_1007,1,0",
        f"449818,{T0},3,430548_1007,0,1",
        f"581738,{T0 + 60},3,430539_1007,1,0",
        f"914836,{T0 + 3 * DAY + 7200},1,430539_1007,0,1",
    ])  # fmt: skip
    write(folder / "ad_feature.csv", [
        "adgroup_id,cate_id,campaign_id,customer,brand,price",
        "1,6261,83237,1,95471,170.0",
        "3,4520,20,3,,9.9",  # a missing brand, as in the real file
    ])  # fmt: skip
    write(folder / "user_profile.csv", [
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level ",
        "581738,0,5,2,6,,3,0,3",
        "449818,0,2,1,2,1,3,0,",
    ])  # fmt: skip
    if behaviors:
        write(folder / "behavior_log.csv", [
            "user,time_stamp,btag,cate,brand",
            f"581738,{T0 - 30},pv,6261,95471",
            f"449818,{T0 + DAY},buy,4520,1",
            f"123,{T0 + DAY},pv,1,1",  # a user without ad impressions: dropped
        ])  # fmt: skip
    return folder


def test_taobao_raw_files_become_canonical_tables(tmp_path):
    tables = imported(taobao_files(tmp_path), "taobao", "pid=430548_1007").tables
    imp = tables["impressions"]
    users, items = source_ids(tables, "user"), source_ids(tables, "item")
    # Time order, exact UTC times, labels from clk, ids mapped back to the source.
    ads = imp[imp["vertical"] != "behavior"]
    assert users.loc[ads["user_id"]].tolist() == [449818, 581738, 581738, 914836]  # every id an int64: an int64 key
    assert items.loc[ads["item_id"]].tolist() == ["3", "3", "1", "1"]  # ads and behaviour pseudo-items: strings
    assert ads["label"].tolist() == [1, 0, 0, 1]
    assert ads["vertical"].tolist() == ["target", "other", "target", "other"]
    assert ads["event_timestamp"].iloc[0] == pd.Timestamp(T0, unit="s", tz="UTC")
    assert ads["hour"].iloc[0] == 0 and str(imp["event_timestamp"].dtype) == "datetime64[us, UTC]"
    # The behaviour log: its own vertical, label 1, a pseudo-item per (category, brand); unknown users dropped.
    beh = imp[imp["vertical"] == "behavior"]
    assert len(beh) == 2 and (beh["label"] == 1).all()
    assert sorted(items.loc[beh["item_id"]]) == ["behavior:4520:1", "behavior:6261:95471"]
    # Item and user attributes: the ad and its behaviour pseudo-item share the category id space.
    item = tables["items"].set_index("item_id")
    ad_1 = item.loc[items[items == "1"].index[0]]
    assert ad_1["category"] == item.loc[items[items == "behavior:6261:95471"].index[0], "category"]
    assert ad_1["price"] == pytest.approx(170.0) and ad_1["vertical"] == "target"
    user = tables["users"].set_index("user_id")
    assert user.loc[users[users == 581738].index[0]].tolist() == [5, 1]  # age_level 6 -> bucket 5; gender 2 -> 1
    assert user.loc[users[users == 914836].index[0]].tolist() == [0, 0]  # no profile
    by_role = imported(tmp_path, "taobao", "category=6261").tables["impressions"]  # a role names its column (cate_id)
    assert (by_role["vertical"] == "target").sum() == 2  # ad 1's two impressions; the behaviour row keeps its vertical
    assert Vocab.from_tables(tables["users"], tables["items"]) == Vocab(3, 4, 2, 3)  # categories 6261, 4520; brands 95471, missing, 1


def test_the_span_and_config_follow_the_data(tmp_path):
    data = imported(taobao_world(tmp_path / "world", users=20), "taobao", "pid=430548_1007")
    assert data.span.start_date == "2017-05-06" and data.span.n_days == 9  # 8 days from 00:55 UTC
    assert data.span.verticals == ("behavior", "other", "target") and sum(data.span.vertical_mix) == pytest.approx(1)
    cfg = configure(RunConfig(), data, explicit={"vm.epochs"})
    assert (cfg.world.n_days, cfg.vm.target_vertical, cfg.world.n_users, cfg.world.latent_dim) == (9, "target", 20, 0)
    assert (cfg.fm.warmup_days, cfg.vm.eval_days) == (3, 2)  # 30% and 20% of the days
    with pytest.raises(ConfigError, match="need 0 < fm.warmup_days < world.n_days - vm.eval_days"):
        configure(RunConfig(), data, explicit={"fm.warmup_days", "vm.eval_days"})  # as set (10, 6): too many days


def test_a_vertical_without_clicks_in_a_window_is_refused(tmp_path):
    data = imported(taobao_files(tmp_path, behaviors=False), "taobao", "pid=430548_1007")  # 4 days, 2 target rows
    with pytest.raises(ConfigError, match=r"1 impressions \(0 clicks\) in its training window \(days 1 to 2 of 4\)"):
        configure(RunConfig(), data, explicit=set())


BARS_TAOBAO_COLUMNS = (
    "clk,btag_his,cate_his,brand_his,userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
    "shopping_level,occupation,new_user_class_level,adgroup_id,cate_id,campaign_id,customer,brand,price,pid,btag"
)


def test_bars_taobao_split_files_in_file_then_row_order(tmp_path):
    write(tmp_path / "train.csv", [
        BARS_TAOBAO_COLUMNS,
        "0,1^1,6261^4520,95471^0,581738,0,5,2,3,1,3,0,3,1,6261,83237,1,95471,170.0,430548_1007,1",
        "1,,,,449818,0,2,1,2,1,3,0,2,3,4520,20,3,0,9.9,430539_1007,1",
    ])  # fmt: skip
    write(tmp_path / "test.csv", [BARS_TAOBAO_COLUMNS, "1,,,,581738,0,5,2,3,1,3,0,3,3,4520,20,3,0,9.9,430548_1007,1"])
    tables = imported(tmp_path, "bars-taobao", "pid=430548_1007", days=3).tables
    imp = tables["impressions"]
    assert source_ids(tables, "user").loc[imp["user_id"]].tolist() == [581738, 449818, 581738]
    assert imp["label"].tolist() == [0, 1, 1] and imp["vertical"].tolist() == ["target", "other", "target"]
    # No time in these files: the rows are spread over --days days, the test file last.
    assert imp["event_timestamp"].is_monotonic_increasing
    assert imp["event_timestamp"].iloc[0] == pd.Timestamp("2000-01-01", tz="UTC")
    assert imp["event_timestamp"].iloc[-1] >= pd.Timestamp("2000-01-03", tz="UTC")


def test_bars_kuaivideo_orders_by_its_timestamp(tmp_path):
    write(tmp_path / "train.csv", [
        "timestamp,user_id,item_id,is_click,is_like,is_follow,pos_items,neg_items",
        "900,7,12,1,0,0,3^4,5",
        "100,8,13,0,0,0,,",
    ])  # fmt: skip
    write(tmp_path / "test.csv", ["timestamp,user_id,item_id,is_click,is_like,is_follow,pos_items,neg_items", "500,7,13,1,1,0,12,"])
    tables = imported(tmp_path, "bars-kuaivideo", "item_id=13").tables
    imp = tables["impressions"]
    assert source_ids(tables, "item").loc[imp["item_id"]].tolist() == [13, 13, 12]  # timestamps 100, 500, 900
    assert imp["label"].tolist() == [0, 1, 1] and imp["vertical"].tolist() == ["target", "target", "other"]
    gaps = imp["event_timestamp"].diff().dropna()
    assert abs(gaps.iloc[0] - gaps.iloc[1]) <= pd.Timedelta(microseconds=1)  # 100 -> 500 -> 900: equal steps


def test_bars_amazon_categories_and_rule(tmp_path):
    write(tmp_path / "train.csv", [
        "label,user_id,item_id,cate_id,item_history,cate_history",
        "1,0,40,7,1^2,7^7",
        "0,1,41,9,3,9",
    ])  # fmt: skip
    tables = imported(tmp_path, "bars-amazon", "cate_id=7,9").tables
    assert tables["impressions"]["vertical"].tolist() == ["target", "target"]
    assert tables["items"]["category"].tolist() == [0, 1]


def movielens_100k(folder: Path) -> Path:
    write(folder / "u.data", ["196\t242\t3\t881250949", "186\t302\t4\t891717742", "196\t302\t5\t881251000"])
    write(folder / "u.user", ["196|49|M|writer|55105", "186|39|F|executive|00000"])
    comedy = ["0", "0", "0", "0", "0", "1"] + ["0"] * 13
    drama = ["0"] * 8 + ["1"] + ["0"] * 10
    write(folder / "u.item", [
        "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|" + "|".join(comedy),
        "302|L.A. Confidential (1997)|01-Jan-1997||http://us.imdb.com/x|" + "|".join(drama[:5] + ["1"] + drama[6:]),
    ], encoding="latin-1")  # fmt: skip
    return folder


def test_movielens_100k_clicks_by_threshold_and_genre_rule(tmp_path):
    tables = imported(movielens_100k(tmp_path), "movielens", "genre=Drama").tables
    imp = tables["impressions"]
    assert source_ids(tables, "item").loc[imp["item_id"]].tolist() == [242, 302, 302]
    assert imp["label"].tolist() == [0, 1, 1]  # ratings 3, 5, 4 with the default threshold 4
    assert imp["vertical"].tolist() == ["other", "target", "target"]  # 302 is Comedy|Drama
    users = tables["users"].set_index("user_id")
    assert users.loc[0].tolist() == [4, 1] and users.loc[1].tolist() == [3, 0]  # age 49 -> 45-55; M=1, F=0
    lower = imported(tmp_path, "movielens", "genre=Comedy", click_threshold=3).tables["impressions"]
    assert lower["label"].tolist() == [1, 1, 1] and (lower["vertical"] == "target").all()


def test_movielens_1m_double_colon_layout(tmp_path):
    write(tmp_path / "ratings.dat", ["1::1193::5::978300760", "2::661::3::978302109", "1::661::4::978301968"])
    write(tmp_path / "users.dat", ["1::F::1::10::48067", "2::M::56::16::70072"])
    write(tmp_path / "movies.dat", ["1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
                                    "661::James and the Giant Peach (1996)::Animation|Children's|Musical"], encoding="latin-1")  # fmt: skip
    tables = imported(tmp_path, "movielens", "genre=Children's").tables
    imp = tables["impressions"]
    assert imp["label"].tolist() == [1, 1, 0] and imp["vertical"].tolist() == ["other", "target", "target"]
    assert imp["event_timestamp"].iloc[0] == pd.Timestamp(978300760, unit="s", tz="UTC")
    assert tables["users"]["age_bucket"].tolist() == [0, 5]  # age codes 1 (<18) and 56 (56+)


def test_any_csv_or_parquet_with_a_column_map(tmp_path):
    df = pd.DataFrame({
        "uid": ["alice", "bob", "alice"], "iid": ["x", "y", "y"], "stars": [5, 1, 4],
        "when": ["2024-03-01T10:00:00Z", "2024-03-02T11:00:00Z", "2024-03-05T12:30:00Z"], "shelf": ["a", "b", "b"],
        # unmapped columns named like canonical ones are just source columns
        "order": ["o-9", "o-1", "o-5"], "price": ["n/a", "n/a", "n/a"], "vertical": ["v", "w", "w"],
    })  # fmt: skip
    df.to_csv(tmp_path / "log.csv", index=False)
    df.to_parquet(tmp_path / "log.parquet")
    (tmp_path / "map.json").write_text(json.dumps({"user_id": "uid", "item_id": "iid", "label": "stars"}))
    roles = parse_map(["timestamp=when", "category=shelf"], tmp_path / "map.json")
    for name in ("log.csv", "log.parquet"):
        tables = imported(tmp_path / name, "csv", "shelf=b", roles=roles, click_threshold=4).tables
        imp = tables["impressions"]
        assert source_ids(tables, "user").loc[imp["user_id"]].tolist() == ["alice", "bob", "alice"]
        assert imp["label"].tolist() == [1, 0, 1] and imp["vertical"].tolist() == ["other", "target", "target"]
        assert imp["event_timestamp"].iloc[2] == pd.Timestamp("2024-03-05 12:30", tz="UTC") and imp["hour"].iloc[2] == 12
    (tmp_path / "map.yaml").write_text("user_id: uid\nitem_id: iid\nlabel: stars\n")
    assert parse_map([], tmp_path / "map.yaml") == {"user_id": "uid", "item_id": "iid", "label": "stars"}
    assert imported(tmp_path / "log.csv", "csv", "vertical=v", roles=roles, click_threshold=1).tables["impressions"]["label"].tolist() == [1, 1, 1]
    (tmp_path / "bad.yaml").write_text("user_id: [uid\n")
    with pytest.raises(DataFormatError, match="bad.yaml: not a valid column map"):
        parse_map([], tmp_path / "bad.yaml")
    with pytest.raises(DataFormatError, match=r"column map: no column given for \['label'\]"):
        imported(tmp_path / "log.csv", "csv", "shelf=b", roles={"user_id": "uid", "item_id": "iid"})


@pytest.mark.parametrize(
    ("fmt", "files", "rule", "expected"),
    [
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,1494032110,1,p,1,0", "x7,1494032110,1,p,1,0"]},
         "pid=p", ["raw_sample.csv: line 3, column 'user': not an integer, got 'x7'"]),
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk", "1,1494032110,1,p,1"]},
         "pid=p", ["raw_sample.csv: missing column 'clk'"]),
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,1494032110,1,p,0,2"]},
         "pid=p", ["line 2, column 'clk': a label must be 0 or 1", "got '2'"]),
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,1494032110,1,p,0,1"]},
         "pid=p", ["ad_feature.csv: file not found"]),
        ("bars-amazon", {"train.csv": ["label,user_id,item_id,cate_id", "1,0,40,7", "1,0,,7"]},
         "cate_id=7", ["train.csv: line 3, column 'item_id': missing value"]),
        ("bars-amazon", {"train.csv": ["label,user_id,item_id,cate_id", "1,0,40,7"]},
         "cate=7", ["--vertical cate=7: the data has no column 'cate'", "cate_id"]),
        ("bars-amazon", {"train.csv": ["label,user_id,item_id,cate_id", "1,0,40,7"]},
         "cate_id=8", ["--vertical cate_id=8: no impression matches", "as --vertical takes them: 7"]),
        ("movielens", {"u.data": ["1\t2\t5\t881250949", "1\t2\t5\t881250949\t9"]},
         "genre=Drama", ["u.data: cannot be read as CSV", "line 2"]),
        ("movielens", {"ratings.dat": ["1::2::five::978300760"], "users.dat": ["1::F::1::10::48067"], "movies.dat": ["2::T::Drama"]}, "genre=Drama",
         ["ratings.dat: line 1, column 'rating': not a number, got 'five'"]),
        ("movielens", {"ratings.txt": ["1"]}, "genre=Drama", ["neither u.data (MovieLens 100K) nor ratings.dat"]),
        ("movielens", {"u.data": ["1\t2\t5\t881250949"], "u.user": ["1|20|M|x|1", "2|30|F|x|1", "3|30|X|x|1"], "u.item": ["2|T|d||u" + "|0" * 19]},
         "genre=Drama", ["u.user: line 3, column 'gender': gender takes two values (F and M come first), got 'X'"]),
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,1494032110000,1,p,1,0"]},
         "pid=p", ["line 2, column 'time_stamp': a unix time in s outside 1980 to 2100, got '1494032110000'"]),
        ("bars-amazon", {"train.csv": ["label,user_id,item_id,cate_id", "1,0,40,7", f"1,{2**64},40,7"]},
         "cate_id=7", [f"train.csv: line 3, column 'user_id': an integer outside [-9223372036854775808, "
                       f"18446744073709551615] cannot be held exactly, got '{2**64}'"]),
        ("bars-amazon", {"train.csv": ["label,user_id,item_id,cate_id", "1,0,40,7", "1,1e3,40,7"]},
         "cate_id=7", ["train.csv: line 3, column 'user_id': not an integer, got '1e3'"]),
        ("taobao", {"raw_sample.csv": ["user,time_stamp,adgroup_id,pid,nonclk,clk", "1,1494032110,1,p,0,1"],
                    "ad_feature.csv": ["adgroup_id,cate_id,campaign_id,customer,brand,price", "1,1,1,1,1,9.9", "1,1,1,1,1,19.9"],
                    "user_profile.csv": ["userid,final_gender_code,age_level", "1,1,2"]},
         "pid=p", ["ad_feature.csv: id(s) ['1'] appear in several rows with different values"]),
        ("csv", {"log.csv": ["uid,iid,y,when", "1,2,1,1790848800", "1,3,0,12345"]},
         "iid=2", ["log.csv: line 3, column 'when': a unix time whose unit cannot be told", "got '12345'"]),
        ("csv", {"log.csv": ["uid,iid,y,when", "1,2,1,1790848800", "1,3,0,1790848800000"]},
         "iid=2", ["log.csv: line 3, column 'when': a unix time in another unit than the column's first row (s)"]),
        ("csv", {"log.csv": ["uid,iid,y,when,price", "1,2,1,1790848800,inf"]},
         "iid=2", ["log.csv: line 2, column 'price': not a finite number, got 'inf'"]),
        ("csv", {"log.csv": ["uid,iid,y,when", "1,2,1,1790848800", "1,  ,0,1790848801"]},
         "iid=2", ["log.csv: line 3, column 'iid': an empty id, got '  '"]),
    ],
)  # fmt: skip
def test_bad_files_are_named_with_column_and_line(tmp_path, fmt, files, rule, expected):
    for name, lines in files.items():
        write(tmp_path / name, lines)
    roles = {"user_id": "uid", "item_id": "iid", "label": "y", "timestamp": "when", "price": "price"} if fmt == "csv" else {}
    with pytest.raises(DataFormatError) as exc:
        imported(tmp_path / "log.csv" if fmt == "csv" else tmp_path, fmt, rule,
                 roles={r: c for r, c in roles.items() if c in files.get("log.csv", [""])[0].split(",")})  # fmt: skip
    for part in expected:
        assert part in str(exc.value)


def test_bad_rules_and_maps_are_refused():
    for text in ("category", "=3", "category=", "category=,"):
        with pytest.raises(DataFormatError, match="expected column=value"):
            VerticalRule.parse(text)
    assert VerticalRule.parse(" genre = Comedy, Drama ").values == ("Comedy", "Drama")
    with pytest.raises(DataFormatError, match="expected role=column"):
        parse_map(["user_id"], None)


def test_the_cli_reports_a_bad_file_without_a_trace_and_keeps_the_old_run(tmp_path):
    run = tmp_path / "run"
    args = ("data", "import", "--run-dir", str(run), "--format", "taobao", "--vertical", "pid=430548_1007")
    loopfm(*args, "--data", str(taobao_world(tmp_path / "good", users=10)))
    before = pd.read_parquet(run / "data" / "impressions.parquet")
    bad = taobao_world(tmp_path / "bad", users=10)
    lines = (bad / "ad_feature.csv").read_text().splitlines()
    write(bad / "ad_feature.csv", [*lines, "81,1,1,1,1,cheap"])  # line 82: a header and 80 ads before it
    r = refusal(*args, "--data", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ad_feature.csv: line 82, column 'price': not a number, got 'cheap'" in r.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(run / "data" / "impressions.parquet"), before)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "data"]  # no staging left behind
    r = refusal(*args, "--data", str(bad), "--map", "user_id=u")
    assert r.returncode == 2 and "--map and --map-file apply to --format csv only" in r.stderr


def taobao_world(folder: Path, users: int = 60, days: int = 8, seed: int = 0) -> Path:
    """A small TaobaoAd-shaped log with a learnable signal: half the categories are clicked more,
    and each user prefers two categories (which the behaviour log reveals)."""
    rng = np.random.default_rng(seed)
    ads = np.arange(1, 81)
    cate = ads % 8
    likes = rng.integers(0, 8, (users, 2))
    rows, beh = [], []
    for u in range(users):
        for _ in range(days * 8):
            ad = int(rng.choice(ads))
            t = T0 + int(rng.integers(0, days * DAY))
            p = 0.05 + 0.4 * (cate[ad - 1] < 4) + 0.3 * (cate[ad - 1] in likes[u])
            click = int(rng.random() < p)
            rows.append(f"{1000 + u},{t},{ad},{'430548_1007' if ad % 2 else '430539_1007'},{1 - click},{click}")
        for _ in range(days * 3):
            beh.append(f"{1000 + u},{T0 + int(rng.integers(0, days * DAY))},pv,{int(rng.choice(likes[u]))},{u % 5}")
    write(folder / "raw_sample.csv", ["user,time_stamp,adgroup_id,pid,nonclk,clk", *rows])
    write(folder / "ad_feature.csv", ["adgroup_id,cate_id,campaign_id,customer,brand,price",
                                      *(f"{a},{cate[a - 1]},{a},{a % 3},{a % 5},{a * 1.5}" for a in ads)])  # fmt: skip
    write(folder / "user_profile.csv", [
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level ",
        *(f"{1000 + u},0,{u % 12},{1 + u % 2},{u % 7},,3,0,2" for u in range(users)),
    ])  # fmt: skip
    write(folder / "behavior_log.csv", ["user,time_stamp,btag,cate,brand", *beh])
    return folder


def test_loopfm_run_end_to_end_on_taobao_files(tmp_path, redis_url):
    run = tmp_path / "run"
    env = {**os.environ, "REDIS_URL": redis_url}
    import subprocess

    from conftest import LOOPFM

    r = subprocess.run(
        [LOOPFM, "run", "--data", str(taobao_world(tmp_path / "taobao")), "--format", "taobao",
         "--vertical", "pid=430548_1007", "--run-dir", str(run),
         "--set", "vm.epochs=2", "--set", "vm.history_length=10", "--set", "fm.code_dim=8"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for n, title in enumerate(["import", "stream-train", "log FM codes", "structure", "feast apply", "train and evaluate"], 1):
        assert f"[{n}/6] {title}" in r.stdout
    quality = json.loads((run / "results" / "quality.json").read_text())
    assert set(quality["models"]) == {"fm", "base", "kd", "loopfm", "loopfm_kd", "popularity", "lr_item", "lr_user_item", "lr_rates", "lr_rates_all", "gbdt"}  # no Bayes row: no truth
    assert all("bayes_gap_closed" not in row for row in quality["models"].values())
    assert "Bayes" not in (run / "results" / "quality.md").read_text()
    assert quality["models"]["fm"]["auc"] > 0.6  # the FM learns which categories are clicked
    print(r.stdout[r.stdout.index("### Held-out"):])


def test_large_integer_ids_are_kept_exactly_never_merged_through_float64(tmp_path):
    """2**53 + k: float64 merges odd and even k; from 2**63 int64 overflows. Every id stays itself."""
    base = 2**53
    rows = [f"{k % 2},{base + k % 30},{2**63 + k % 7},{k % 3}" for k in range(60)]
    write(tmp_path / "train.csv", ["label,user_id,item_id,cate_id", *rows])
    tables = imported(tmp_path, "bars-amazon", "cate_id=1").tables
    assert len(tables["users"]) == 30 and len(tables["items"]) == 7
    assert source_ids(tables, "user").dtype == np.int64  # int64 keys, exact beyond 2**53
    assert sorted(source_ids(tables, "user")) == [base + k for k in range(30)]
    assert sorted(source_ids(tables, "item").map(int)) == [2**63 + k for k in range(7)]  # beyond int64: string keys


def test_each_entitys_source_ids_are_int64_when_every_id_is_a_plain_int64_else_strings():
    assert source_ids_of(["7", "-3", "0", str(2**63 - 1), str(-(2**63))]) == [7, -3, 0, 2**63 - 1, -(2**63)]
    for odd_one in ("07", "+7", "7.0", " 7", "-0", str(2**63), "a7"):  # text names another id than the integer would
        assert source_ids_of(["7", odd_one]) == ["7", odd_one], odd_one


def test_ids_read_from_a_numeric_column_are_their_exact_decimal_text_never_float_text():
    from loopfm.data.parse import BadValues, text_ids

    assert text_ids(pd.Series([13.0, 7.0, None])).tolist() == ["13", "7", pd.NA]
    assert text_ids(pd.Series([2**63 + 1], dtype="uint64")).tolist() == [str(2**63 + 1)]
    assert text_ids(pd.Series(["007", "a7"])).tolist() == ["007", "a7"]  # text stays as written
    with pytest.raises(BadValues, match="beyond 2\\*\\*53"):
        text_ids(pd.Series([float(2**53 + 2)]))


def source_ids_of(keys: list[str]) -> list:
    from loopfm.data.parse import source_ids

    return source_ids(pd.Series(keys, dtype="string[pyarrow]")).tolist()  # ints from an int64 column, else str


def test_one_time_parser_infers_the_unit_from_the_size_or_takes_it_given(tmp_path):
    """1790848800 is 2026-10-01 10:00 UTC in seconds, not 1.79 s after 1970 in nanoseconds."""
    expected = pd.Timestamp("2026-10-01 10:00", tz="UTC")
    for unit, value in (("s", 1790848800), ("ms", 1790848800_000), ("us", 1790848800_000_000), ("ns", 1790848800_000_000_000)):
        lines = ["uid,iid,y,when", f"1,2,1,{value}", f"1,3,0,{value + 1}", f"2,2,0,{value}"]
        write(tmp_path / "log.csv", lines)
        roles = {"user_id": "uid", "item_id": "iid", "label": "y", "timestamp": "when"}
        for given in (None, unit):
            imp = imported(tmp_path / "log.csv", "csv", "iid=2", roles=roles, time_unit=given).tables["impressions"]
            assert imp["event_timestamp"].iloc[0] == expected, (unit, given)
    write(tmp_path / "log.csv", ["uid,iid,y,when", "1,2,1,1790848800"])
    with pytest.raises(DataFormatError, match="line 2, column 'when': a unix time in ms outside 1980 to 2100"):
        imported(tmp_path / "log.csv", "csv", "iid=2", roles=roles, time_unit="ms")


def test_float64_id_columns_are_read_as_exact_integers_or_refused_never_merged(tmp_path):
    """A parquet file whose id columns are float64: 13.0 is the id 13 (not the text '13.0');
    ids float64 may have rounded (beyond 2**53: 123456789012345678 and ...679 are one float)
    and fractions are refused naming the column and row."""
    log = pd.DataFrame({"uid": [13.0, 7.0, 13.0], "iid": [1.0, 2.0, 2.0], "stars": [5, 1, 4], "shelf": ["a", "b", "b"]})
    roles = {"user_id": "uid", "item_id": "iid", "label": "stars", "category": "shelf"}
    log.to_parquet(tmp_path / "log.parquet")
    tables = imported(tmp_path / "log.parquet", "csv", "shelf=b", roles=roles, click_threshold=4).tables
    assert source_ids(tables, "user").dtype == np.int64 and sorted(source_ids(tables, "user")) == [7, 13]
    for uid, problem in (([123456789012345678.0, 123456789012345679.0, 7.0], "beyond 2**53 cannot be held exactly"),
                         ([13.0, 7.5, 13.0], "not an integer")):  # fmt: skip
        log.assign(uid=uid).to_parquet(tmp_path / "bad.parquet")
        with pytest.raises(DataFormatError, match=r"bad.parquet: row [12], column 'uid': ") as refused:
            imported(tmp_path / "bad.parquet", "csv", "shelf=b", roles=roles, click_threshold=4)
        assert problem in str(refused.value)


@pytest.mark.parametrize("name, sep", [("events.tsv.gz", "\t"), ("events.TSV", "\t"), ("events.csv.gz", ","), ("events.csv.bz2", ",")])
def test_a_csv_files_separator_follows_its_name_before_the_compression_suffix(tmp_path, name, sep):
    from loopfm.core.files import text_separator

    assert text_separator(Path(name)) == sep
    log = pd.DataFrame({"uid": ["a", "b"], "iid": ["x", "y"], "clicked": [1, 0], "shelf": ["s", "t"]})
    log.to_csv(tmp_path / name, sep=sep, index=False)
    roles = {"user_id": "uid", "item_id": "iid", "label": "clicked", "category": "shelf"}
    tables = imported(tmp_path / name, "csv", "shelf=s", roles=roles).tables
    assert source_ids(tables, "user").tolist() == ["a", "b"]


def test_names_without_a_separator_suffix_give_none():
    from loopfm.core.files import text_separator

    assert [text_separator(Path(n)) for n in ("log.parquet", "u.data", "events.gz", "events")] == [None] * 4


ROLES = {"user_id": "uid", "item_id": "iid", "label": "y", "timestamp": "when", "category": "shelf"}


def test_a_vertical_value_holding_a_comma_is_selected_by_quoting_it_and_offered_that_way(tmp_path):
    write(tmp_path / "log.csv", ["uid,iid,y,when,shelf", '1,2,1,1790848800,"Books, Kids"', "1,3,0,1790848900,Books",
                                 "2,2,0,1790849000,Kids", '2,4,1,1790849100,"Toys"'])  # fmt: skip
    rule = VerticalRule.parse('shelf="Books, Kids",Toys')
    assert rule.values == ("Books, Kids", "Toys") and VerticalRule.parse(str(rule)) == rule
    assert imported(tmp_path / "log.csv", "csv", str(rule), roles=ROLES).tables["impressions"]["vertical"].tolist() == [
        "target", "other", "other", "target"]  # fmt: skip
    with pytest.raises(DataFormatError, match=r"""no impression matches; .*as --vertical takes them: .*"Books, Kids\"""") as refused:
        imported(tmp_path / "log.csv", "csv", "shelf=Books Kids", roles=ROLES)
    offered = str(refused.value).split("takes them: ")[1]  # pasted back into the rule, each value is one value
    assert sorted(VerticalRule.parse(f"shelf={offered}").values) == ["Books", "Books, Kids", "Kids", "Toys"]
    with pytest.raises(DataFormatError, match="a value holding a comma goes in double quotes"):
        VerticalRule.parse('shelf="Books, Kids"x')


def test_a_time_zone_abbreviation_is_refused_naming_the_line_never_read_as_utc(tmp_path, recwarn):
    write(tmp_path / "log.csv", ["uid,iid,y,when,shelf", "1,2,1,2026-09-01 00:00:10+00:00,a",
                                 "1,3,0,2026-09-01 00:00:20 EST,a", "2,2,0,2026-09-01 00:00:30 EST,b"])  # fmt: skip
    with pytest.raises(DataFormatError, match=r"log.csv: line 3, column 'when': a time zone abbreviation \(EST\) that "
                                              r"names no one zone.*got '2026-09-01 00:00:20 EST' \(1 more such rows\)"):
        imported(tmp_path / "log.csv", "csv", "shelf=a", roles=ROLES)
    assert not [w for w in recwarn if "tzname" in str(w.message)]  # no warning per row either
    write(tmp_path / "log.csv", ["uid,iid,y,when,shelf", "1,2,1,2026-09-01 00:00:20-05:00,a", "1,3,0,2026-09-01 05:00:30 UTC,a",
                                 "2,2,0,2026-09-01 05:00:40Z,b"])  # fmt: skip
    imp = imported(tmp_path / "log.csv", "csv", "shelf=a", roles=ROLES).tables["impressions"]
    assert imp["event_timestamp"].tolist() == [pd.Timestamp(f"2026-09-01 05:00:{s}", tz="UTC") for s in (20, 30, 40)]


def test_rows_repeated_in_every_column_are_dropped_once_and_counted_rows_without_time_are_kept(tmp_path):
    lines = ["uid,iid,y,when,shelf", "1,2,1,1790848800,a", "1,3,0,1790848900,a", "2,2,0,1790849000,b"]
    write(tmp_path / "log.csv", [*lines, lines[1], lines[1], lines[3]])
    result = imported(tmp_path / "log.csv", "csv", "shelf=a", roles=ROLES)
    assert len(result.tables["impressions"]) == 3 and result.span.duplicates == 3
    write(tmp_path / "log.csv", [*lines, "1,2,1,1790848801,a"])  # a second later: another impression
    assert imported(tmp_path / "log.csv", "csv", "shelf=a", roles=ROLES).span.duplicates == 0
    untimed = {k: v for k, v in ROLES.items() if k != "timestamp"} | {"order": "when"}
    write(tmp_path / "log.csv", [*lines, lines[1]])
    result = imported(tmp_path / "log.csv", "csv", "shelf=a", roles=untimed)
    assert len(result.tables["impressions"]) == 4 and result.span.duplicates == 0  # no absolute time: kept


def test_the_import_summary_says_how_many_repeated_rows_it_dropped(tmp_path):
    world = taobao_world(tmp_path / "world", users=10)
    lines = (world / "raw_sample.csv").read_text().splitlines()
    write(world / "raw_sample.csv", [*lines, *lines[1:4]])
    out = loopfm("data", "import", "--run-dir", str(tmp_path / "run"), "--format", "taobao", "--vertical",
                 "pid=430548_1007", "--data", str(world)).stdout  # fmt: skip
    assert "; 3 repeated rows dropped (every column equal to an earlier row's)" in out
