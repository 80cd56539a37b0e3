"""Tests for mme.offline.sources: tiny fake dataset trees with empty placeholder video files."""
import hashlib
import json
import re

import pytest

from mme.offline import sources
from mme.offline.sources import SourceError, Video, class_names, list_videos


def touch(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def keys(videos):
    return [v.key for v in videos]


def check_keys_safe(videos):
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", v.key) for v in videos)
    assert len(set(keys(videos))) == len(videos)
    assert keys(videos) == sorted(keys(videos))


# ---------------------------------------------------------------------------------------------
# Kinetics-400

K400_HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"


def test_k400_flat_layout_missing_clip_and_unlabelled_file(tmp_path):
    touch(tmp_path / "annotations/train.csv", K400_HEADER
          + "air drumming,abc,10,20,train,0\n"
          + "abseiling,x-Y_z,0,10,train,0\n"
          + "abseiling,gone,5,15,train,0\n")
    touch(tmp_path / "annotations/val.csv", K400_HEADER + "zumba,val1,0,10,val,0\n")
    a = touch(tmp_path / "train/abc_000010_000020.mp4")
    b = touch(tmp_path / "train/x-Y_z_000000_000010.mp4")
    stray = touch(tmp_path / "train/stray.mp4")
    touch(tmp_path / "train/._abc_000010_000020.mp4")   # macOS resource fork: ignored

    videos, problems = list_videos("k400", str(tmp_path), "train")
    # classes are the union of all csvs, sorted: identical indices for train and val
    assert class_names("k400", str(tmp_path)) == ["abseiling", "air drumming", "zumba"]
    assert videos == [
        Video(str(a), "abc_000010_000020", 1, "air drumming", "train"),
        Video(str(b), "x-Y_z_000000_000010", 0, "abseiling", "train"),
    ]
    assert len(problems) == 2
    assert problems[0]["video"] == "gone_000005_000015"
    assert problems[0]["reason"] == f"missing: no video file for gone_000005_000015 under {tmp_path / 'train'}"
    assert problems[1]["video"] == str(stray)
    assert problems[1]["reason"].startswith("unlabelled:") and "train.csv" in problems[1]["reason"]


def test_k400_duplicate_row_reported_once(tmp_path):
    touch(tmp_path / "train.csv", K400_HEADER + "abseiling,abc,0,10,train,0\n" * 2)
    clip = touch(tmp_path / "train/abseiling/abc_000000_000010.mp4")
    videos, problems = list_videos("k400", str(tmp_path), "train")
    assert keys(videos) == ["abc_000000_000010"]
    assert problems == [{"video": str(clip), "reason": "duplicate: listed more than once as abc_000000_000010"}]


def test_k400_class_folders_float_times_validate_csv_and_mkv(tmp_path):
    # validate.csv at ROOT (no annotations/), clips under videos/val/<class>/ with both folder styles
    touch(tmp_path / "validate.csv", "label,youtube_id,time_start,time_end,split\n"
          + "air drumming,abc,10.0,20.0,validate\n"
          + '"petting animal (not cat)",p_q,3.0,13.0,validate\n')
    a = touch(tmp_path / "videos/val/air_drumming/abc_000010_000020.mp4")
    p = touch(tmp_path / "videos/val/petting animal (not cat)/p_q_000003_000013.mkv")
    videos, problems = list_videos("k400", str(tmp_path), "val")
    assert problems == []
    assert videos == [
        Video(str(a), "abc_000010_000020", 0, "air drumming", "val"),
        Video(str(p), "p_q_000003_000013", 1, "petting animal (not cat)", "val"),
    ]


def test_k400_test_split_without_labels(tmp_path):
    touch(tmp_path / "annotations/train.csv", K400_HEADER + "abseiling,tr,0,10,train,0\n")
    touch(tmp_path / "annotations/test.csv", "youtube_id,time_start,time_end,split\n"
          + "t2,1,11,test\nt1,0,10,test\n")
    touch(tmp_path / "test/t1_000000_000010.mp4")
    touch(tmp_path / "test/t2_000001_000011.webm")
    videos, problems = list_videos("k400", str(tmp_path), "test")
    assert problems == []
    assert keys(videos) == ["t1_000000_000010", "t2_000001_000011"]
    assert [(v.label, v.label_name, v.split) for v in videos] == [(-1, "", "test")] * 2
    assert videos[1].path == str(tmp_path / "test/t2_000001_000011.webm")


def test_k400_errors(tmp_path):
    touch(tmp_path / "annotations/train.csv", K400_HEADER + "abseiling,abc,0,10,train,0\n")
    with pytest.raises(SourceError, match="val annotation csv not found") as e:
        list_videos("k400", str(tmp_path), "val")
    assert "val.csv" in str(e.value) and "validate.csv" in str(e.value)
    # labels exist but no clip at all: an error naming the folders searched, not a list of problems
    with pytest.raises(SourceError, match="no train videos found") as e:
        list_videos("k400", str(tmp_path), "train")
    assert str(tmp_path / "train") in str(e.value) and str(tmp_path / "videos/train") in str(e.value)


def test_k400_no_csv_at_all(tmp_path):
    with pytest.raises(SourceError, match="train.csv"):
        list_videos("k400", str(tmp_path), "train")
    with pytest.raises(SourceError, match="annotation csv not found"):
        class_names("k400", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Something-Something V2

def ssv2_tree(root):
    # labels.json order differs from sorted order: the index must come from the file
    labels = {"Pushing something from left to right": "0", "Holding something next to something": "1",
              "Approaching something with your camera": "2"}
    touch(root / "labels/labels.json", json.dumps(labels))
    touch(root / "labels/train.json", json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "bottle"]},
        {"id": "42", "label": "pushing pen from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["pen"]},
        {"id": "7", "label": "approaching x", "template": "Approaching [something] with your camera",
         "placeholders": ["x"]},
    ]))
    touch(root / "labels/validation.json", json.dumps([
        {"id": "100", "label": "approaching door", "template": "Approaching [something] with your camera",
         "placeholders": ["door"]},
        {"id": "101", "label": "pushing cup", "template": "Pushing [something] from left to right",
         "placeholders": ["cup"]},
    ]))
    touch(root / "labels/test.json", json.dumps([{"id": "200"}, {"id": "201"}]))
    for vid in ("78687", "42", "100", "101", "200", "201"):   # "7" is missing on disk
        touch(root / f"20bn-something-something-v2/{vid}.webm")


def test_ssv2_train_template_mapping_and_missing(tmp_path):
    ssv2_tree(tmp_path)
    assert class_names("ssv2", str(tmp_path)) == ["Pushing something from left to right",
                                                  "Holding something next to something",
                                                  "Approaching something with your camera"]
    videos, problems = list_videos("ssv2", str(tmp_path), "train")
    assert videos == [
        Video(str(tmp_path / "20bn-something-something-v2/42.webm"), "42", 0,
              "Pushing something from left to right", "train"),
        Video(str(tmp_path / "20bn-something-something-v2/78687.webm"), "78687", 1,
              "Holding something next to something", "train"),
    ]
    assert problems == [{"video": "7", "reason": "missing: no video file for 7 under "
                         + str(tmp_path / "20bn-something-something-v2") + " or " + str(tmp_path)}]


def test_ssv2_val_and_test(tmp_path):
    ssv2_tree(tmp_path)
    val, problems = list_videos("ssv2", str(tmp_path), "val")
    assert problems == []
    assert [(v.key, v.label, v.label_name, v.split) for v in val] == [
        ("100", 2, "Approaching something with your camera", "val"),
        ("101", 0, "Pushing something from left to right", "val"),
    ]
    test, _ = list_videos("ssv2", str(tmp_path), "test")
    assert [(v.key, v.label, v.label_name) for v in test] == [("200", -1, ""), ("201", -1, "")]


def test_ssv2_flat_root_and_unknown_template(tmp_path):
    touch(tmp_path / "labels.json", json.dumps({"Holding something": "0"}))
    touch(tmp_path / "train.json", json.dumps([
        {"id": "1", "template": "holding  [Something]"},        # case/space-insensitive lookup
        {"id": "2", "template": "Juggling [something]"},
    ]))
    touch(tmp_path / "videos/1.webm")
    touch(tmp_path / "videos/2.webm")
    videos, problems = list_videos("ssv2", str(tmp_path), "train")
    assert [(v.key, v.label, v.label_name) for v in videos] == [("1", 0, "Holding something")]
    assert [p["video"] for p in problems] == ["2"] and problems[0]["reason"].startswith("unknown class")


def test_ssv2_missing_label_files(tmp_path):
    touch(tmp_path / "labels/train.json", json.dumps([{"id": "1", "template": "X"}]))
    touch(tmp_path / "videos/1.webm")
    with pytest.raises(SourceError, match="labels.json not found") as e:
        list_videos("ssv2", str(tmp_path), "train")
    assert str(tmp_path / "labels/labels.json") in str(e.value)
    with pytest.raises(SourceError, match="validation.json not found"):
        list_videos("ssv2", str(tmp_path), "val")


# ---------------------------------------------------------------------------------------------
# UCF101

def ucf_tree(root):
    # classInd order is not string-sorted here: the label must follow classInd, not sorted names
    lists = root / "ucfTrainTestlist"
    touch(lists / "classInd.txt", "1 YoYo\r\n2 ApplyEyeMakeup\r\n3 Basketball\r\n")
    touch(lists / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\n"
          "YoYo/v_YoYo_g08_c01.avi 1\r\n"
          "Basketball/v_Basketball_g09_c01.avi 3\r\n")
    touch(lists / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
          "YoYo/v_YoYo_g01_c01.avi\r\n")
    touch(lists / "trainlist02.txt", "YoYo/v_YoYo_g01_c01.avi 1\r\n")
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "YoYo/v_YoYo_g08_c01.avi",
                "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"):
        touch(root / "UCF-101" / rel)


def test_ucf101_fold1_train_and_test(tmp_path):
    ucf_tree(tmp_path)
    assert class_names("ucf101", str(tmp_path)) == ["YoYo", "ApplyEyeMakeup", "Basketball"]
    train, problems = list_videos("ucf101", str(tmp_path), "train", fold=1)
    assert train == [
        Video(str(tmp_path / "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"),
              "v_ApplyEyeMakeup_g08_c01", 1, "ApplyEyeMakeup", "train"),
        Video(str(tmp_path / "UCF-101/YoYo/v_YoYo_g08_c01.avi"), "v_YoYo_g08_c01", 0, "YoYo", "train"),
    ]
    assert [p["video"] for p in problems] == ["Basketball/v_Basketball_g09_c01.avi"]
    assert problems[0]["reason"].startswith("missing: no video file for Basketball/v_Basketball_g09_c01.avi")

    for split in ("val", "test"):
        test, problems = list_videos("ucf101", str(tmp_path), split, fold=1)
        assert problems == []
        assert [(v.key, v.label, v.split) for v in test] == [
            ("v_ApplyEyeMakeup_g01_c01", 1, split), ("v_YoYo_g01_c01", 0, split)]

    fold2, _ = list_videos("ucf101", str(tmp_path), "train", fold=2)
    assert keys(fold2) == ["v_YoYo_g01_c01"]


def test_ucf101_flat_lists_in_root_and_errors(tmp_path):
    touch(tmp_path / "classInd.txt", "1 YoYo\n")
    touch(tmp_path / "trainlist01.txt", "YoYo/v_YoYo_g08_c01.avi 1\n")
    touch(tmp_path / "YoYo/v_YoYo_g08_c01.avi")
    videos, _ = list_videos("ucf101", str(tmp_path), "train")
    assert [(v.key, v.label) for v in videos] == [("v_YoYo_g08_c01", 0)]
    with pytest.raises(SourceError, match="testlist01.txt not found") as e:
        list_videos("ucf101", str(tmp_path), "test")
    assert str(tmp_path / "ucfTrainTestlist/testlist01.txt") in str(e.value)
    with pytest.raises(SourceError, match="fold"):
        list_videos("ucf101", str(tmp_path), "train", fold=4)
    (tmp_path / "classInd.txt").unlink()
    with pytest.raises(SourceError, match="classInd.txt not found"):
        list_videos("ucf101", str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------
# HMDB51

def test_hmdb51_split_ids(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    touch(splits / "brush_hair_test_split1.txt",
          "Faith_Rewarded!_(3)_brush_hair_f_nm_np1_ba_med_0.avi 1 \n"
          "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \n"
          "unused_brush_hair_0.avi 0 \n")
    touch(splits / "cartwheel_test_split1.txt", "cart_a.avi 1\ncart_b.avi 2\ncart_gone.avi 1\n")
    touch(splits / "brush_hair_test_split2.txt", "unused_brush_hair_0.avi 1\n")
    for rel in ("brush_hair/Faith_Rewarded!_(3)_brush_hair_f_nm_np1_ba_med_0.avi",
                "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                "brush_hair/unused_brush_hair_0.avi", "cartwheel/cart_a.avi", "cartwheel/cart_b.avi"):
        touch(tmp_path / "hmdb51_org" / rel)

    assert class_names("hmdb51", str(tmp_path)) == ["brush_hair", "cartwheel"]
    train, problems = list_videos("hmdb51", str(tmp_path), "train")
    assert train == [
        Video(str(tmp_path / "hmdb51_org/brush_hair/Faith_Rewarded!_(3)_brush_hair_f_nm_np1_ba_med_0.avi"),
              "Faith_Rewarded___3__brush_hair_f_nm_np1_ba_med_0", 0, "brush_hair", "train"),
        Video(str(tmp_path / "hmdb51_org/cartwheel/cart_a.avi"), "cart_a", 1, "cartwheel", "train"),
    ]
    assert [p["video"] for p in problems] == ["cart_gone.avi"]
    for split in ("val", "test"):
        test, problems = list_videos("hmdb51", str(tmp_path), split)
        assert problems == []
        assert [(v.key, v.label, v.split) for v in test] == [
            ("April_09_brush_hair_u_nm_np1_ba_goo_0", 0, split), ("cart_b", 1, split)]
    fold2, _ = list_videos("hmdb51", str(tmp_path), "train", fold=2)
    assert [(v.key, v.label) for v in fold2] == [("unused_brush_hair_0", 0)]


def test_hmdb51_missing_split_files(tmp_path):
    touch(tmp_path / "brush_hair/a.avi")
    with pytest.raises(SourceError, match=r"<class>_test_split1.txt not found") as e:
        list_videos("hmdb51", str(tmp_path), "train")
    assert str(tmp_path / "testTrainMulti_7030_splits") in str(e.value)


# ---------------------------------------------------------------------------------------------
# any folder

def test_folder_nested_classes_and_stem_collision(tmp_path):
    touch(tmp_path / "animals/cat/001.mp4")
    touch(tmp_path / "dog/001.MP4")            # same stem in another class: no collision
    touch(tmp_path / "top level.webm")         # directly in ROOT: no class
    touch(tmp_path / "cat/a b.mp4")            # "a b" and "a_b" both sanitize to cat__a_b
    touch(tmp_path / "cat/a_b.avi")
    touch(tmp_path / "cat/notes.txt")          # not a video
    touch(tmp_path / "cat/.hidden.mp4")        # hidden: not a video

    assert class_names("folder", str(tmp_path)) == ["cat", "dog"]
    videos, problems = list_videos("folder", str(tmp_path), "val")
    assert problems == []
    check_keys_safe(videos)
    h = {rel: hashlib.sha1(rel.encode()).hexdigest()[:8] for rel in ("cat/a b.mp4", "cat/a_b.avi")}
    by_key = {v.key: v for v in videos}
    assert set(by_key) == {"animals__cat__001", "dog__001", "top_level",
                           f"cat__a_b_{h['cat/a b.mp4']}", f"cat__a_b_{h['cat/a_b.avi']}"}
    assert by_key["animals__cat__001"] == Video(str(tmp_path / "animals/cat/001.mp4"),
                                                "animals__cat__001", 0, "cat", "val")
    assert (by_key["dog__001"].label, by_key["dog__001"].label_name) == (1, "dog")
    assert (by_key["top_level"].label, by_key["top_level"].label_name) == (-1, "")
    assert by_key[f"cat__a_b_{h['cat/a b.mp4']}"].path == str(tmp_path / "cat/a b.mp4")
    assert list_videos("folder", str(tmp_path), "val") == (videos, problems)   # stable across runs


def test_folder_without_videos(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(SourceError, match="no train videos found") as e:
        list_videos("folder", str(tmp_path))
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# common errors

@pytest.mark.parametrize("src", ["k400", "ssv2", "ucf101", "hmdb51", "folder"])
def test_missing_root(tmp_path, src):
    root = tmp_path / "nope"
    with pytest.raises(SourceError) as e:
        list_videos(src, str(root))
    assert str(e.value) == f"{src}: dataset root {root} does not exist; pass --root DIR"
    with pytest.raises(SourceError, match="--root"):
        class_names(src, str(root))


@pytest.mark.parametrize("src", ["k400", "ssv2", "ucf101", "hmdb51", "folder"])
def test_unknown_split(tmp_path, src):
    with pytest.raises(SourceError, match="unknown split 'dev'"):
        list_videos(src, str(tmp_path), "dev")


def test_synthetic_and_unknown_source(tmp_path):
    assert "synthetic" in sources.SOURCES
    with pytest.raises(ValueError, match="synthetic"):
        list_videos("synthetic", str(tmp_path))
    with pytest.raises(ValueError, match="unknown source"):
        list_videos("kinetics", str(tmp_path))


def test_video_is_frozen():
    v = Video("/x.mp4", "x", 0, "a", "train")
    with pytest.raises(Exception):
        v.key = "y"
