"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), as reviewers would use it: a token, keyboard shortcuts, a span selected with the mouse,
undo, reload, the export; two reviewers on the same items and an admin resolving their
disagreement; the layout at 390 px and 1600 px.

``TORCHTUNE_BLAH_SCREENSHOT_DIR=docs python -m pytest tests/test_review_browser.py`` also writes
docs/review.md's screenshots (small palette PNGs) from this same session.
"""

import json
import os
import re
import shutil

import pytest
from review_fixtures import eval_output, server  # noqa: F401  (fixtures)

from torchtune_blah.review.__main__ import main as review_cli
from torchtune_blah.review.sources import read_items

pytestmark = pytest.mark.slow  # a trained run, an evaluation and headless Chromium: the full suite only (python -m pytest -q)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,820"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _item(driver):
    return driver.execute_script(
        "return {id: document.getElementById('qid').textContent, "
        "answer: document.getElementById('model-answer').textContent, "
        "context: document.getElementById('context').textContent}")


def _press(driver, key):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def _saved(driver, what):
    return _wait(driver, lambda d: d.find_element("id", "message").text.startswith(f"Saved: {what}")
                 or "error" in d.find_element("id", "message").get_attribute("class"))


def _next_item_after(driver, previous_id):
    _wait(driver, lambda d: d.find_element("id", "qid").text != previous_id or d.find_element("id", "empty")
          .is_displayed())
    return _item(driver)


def _double_click_word(driver, word_index):
    """Select the ``word_index``-th all-letter word of the context with a mouse double-click;
    returns (word, offset in the context)."""
    from selenium.webdriver.common.action_chains import ActionChains

    context_el = driver.find_element("id", "context")
    text = _item(driver)["context"]
    match = [m for m in re.finditer(r"\b[A-Za-z]{5,}\b", text)][word_index]
    box = driver.execute_script("""
        const box = document.getElementById('context'), start = arguments[0], end = arguments[1];
        const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
        let node, seen = 0;
        while ((node = walker.nextNode())) {
          if (start < seen + node.length) {
            const range = document.createRange();
            range.setStart(node, start - seen); range.setEnd(node, end - seen);
            const r = range.getBoundingClientRect(), b = box.getBoundingClientRect();
            return [r.left + r.width / 2 - (b.left + b.width / 2), r.top + r.height / 2 - (b.top + b.height / 2)];
          }
          seen += node.length;
        }""", match.start(), match.end())
    ActionChains(driver).move_to_element_with_offset(context_el, int(box[0]), int(box[1])).double_click().perform()
    return match.group(0), match.start()


def _not_blank(png_path):
    from PIL import Image

    image = Image.open(png_path).convert("L")
    low, high = image.getextrema()
    colors = len(image.getcolors(maxcolors=1 << 16) or [])
    return high - low > 100 and colors > 20


def _sign_in(driver, url, token):
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")  # whoever was signed in here before
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element("id", "login").is_displayed())
    driver.find_element("id", "token").send_keys(token + "\n")
    _wait(driver, lambda d: d.find_element("id", "item").is_displayed() or d.find_element("id", "empty").is_displayed())


def test_a_reviewer_works_through_the_page(server, eval_output, browser, tmp_path):  # noqa: F811
    db, url, tokens = server
    assert review_cli(["import", "--db", db.path, str(eval_output / "predictions.jsonl")]) == 0
    total = db.progress()["total"]
    driver = browser
    driver.get(url + "/")
    assert driver.find_element("id", "login").is_displayed() and not driver.find_element("id", "item").is_displayed()
    _sign_in(driver, url, tokens["ana"])
    assert driver.find_element("id", "whoami").text == "ana" and not driver.find_element("id", "login").is_displayed()
    assert driver.find_element("id", "guidelines").is_displayed()
    expected = {}

    # 1. accept the model's answer (keyboard "a"); items whose answer cannot be accepted are skipped ("k")
    while True:
        item = _item(driver)
        if item["answer"] != "(not valid JSON)":
            _press(driver, "a")
            _saved(driver, "accept")
            if driver.find_element("id", "message").text.startswith("Saved"):
                answer = "?" if item["answer"].startswith("?") else item["answer"]
                expected[item["id"]] = [] if answer == "?" else [
                    {"text": answer, "answer_start": item["context"].find(answer)}]
                break
        _press(driver, "k")
        _next_item_after(driver, item["id"])
    item = _next_item_after(driver, item["id"])

    # 2. no answer in the context (keyboard "n", pressed twice at once: one decision, no error)
    decided = len(db.decisions())
    _press(driver, "nn")
    _saved(driver, "no answer")
    expected[item["id"]] = []
    item = _next_item_after(driver, item["id"])
    assert len(db.decisions()) == decided + 1 and "error" not in driver.find_element("id", "message").get_attribute(
        "class")

    # 3. a span selected with the mouse, then the button
    word, start = _double_click_word(driver, 2)
    _wait(driver, lambda d: d.find_element("id", "selected").text == f'"{word}"')
    driver.save_screenshot(str(tmp_path / "review_page.png"))
    driver.find_element("id", "use-selection").click()
    _saved(driver, "span")
    assert driver.find_element("id", "message").text == f'Saved: span "{word}".'
    span_item = item
    _next_item_after(driver, span_item["id"])
    assert db.decisions()[-1]["answer"] == word and db.decisions()[-1]["answer_start"] == start

    # 4. undo it (keyboard "u"): the span item is back
    _press(driver, "u")
    _wait(driver, lambda d: d.find_element("id", "qid").text == span_item["id"])
    assert db.decisions()[-1]["action"] == "undo"

    # 5. reload: the decisions persist, the undone item is still this reviewer's
    driver.refresh()
    _wait(driver, lambda d: d.find_element("id", "qid").text == span_item["id"])
    assert driver.find_element("id", "progress").text.startswith(f"{len(expected)} / {total} reviewed")
    screenshot = tmp_path / "after_reload.png"
    driver.save_screenshot(str(screenshot))
    assert _not_blank(screenshot) and _not_blank(tmp_path / "review_page.png")

    # 6. export: exactly those decisions
    out = tmp_path / "corrections.jsonl"
    assert review_cli(["export", "--db", db.path, "--out", str(out)]) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {k: r["answers"] for k, r in records.items()} == expected



def test_two_reviewers_on_each_item_and_an_admin_who_resolves(server, browser, tmp_path):  # noqa: F811
    from review_fixtures import synthetic_generations

    db, url, tokens = server
    db.set_overlap(2)
    db.import_items(read_items(synthetic_generations(tmp_path / "g.jsonl", 3)))
    driver = browser
    # ana: no answer; bo: a span of the same item (the page shows both of them the same first item)
    _sign_in(driver, url, tokens["ana"])
    first = _item(driver)
    _press(driver, "n")
    _saved(driver, "no answer")
    _sign_in(driver, url, tokens["bo"])
    assert _item(driver)["id"] == first["id"]
    word, start = _double_click_word(driver, 1)
    _wait(driver, lambda d: d.find_element("id", "selected").text == f'"{word}"')
    _press(driver, "s")
    _saved(driver, "span")
    driver.find_element("css selector", "#stats summary").click()
    _wait(driver, lambda d: "1 in disagreement" in d.find_element("id", "stats-body").text)
    assert "ana" in driver.find_element("id", "stats-body").text
    # root (admin) picks bo's answer
    _sign_in(driver, url, tokens["root"])
    assert driver.find_element("id", "admin").is_displayed()
    driver.find_element("css selector", "#admin summary").click()
    button = _wait(driver, lambda d: next((b for b in d.find_elements("css selector", "#disagreements button")
                                           if b.text.startswith(f'bo: "{word}"')), None))
    assert any(b.text.startswith("ana: no answer") for b in driver.find_elements("css selector", "#disagreements button"))
    button.click()
    _wait(driver, lambda d: d.find_element("id", "message").text.startswith("Resolved"))
    out = tmp_path / "corrections.jsonl"
    assert review_cli(["export", "--db", db.path, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["id"] == first["id"] and record["answers"] == [{"text": word, "answer_start": start}]
    assert record["resolution"] == "admin" and record["reviewers"] == ["bo"]
    # bo finds the decision in the history and revises it: a new row, the old one stays
    _sign_in(driver, url, tokens["bo"])
    driver.find_element("css selector", "#history summary").click()
    revise = _wait(driver, lambda d: next(iter(d.find_elements("css selector", "#history-list button")), None))
    assert f'"{word}"' in driver.find_element("id", "history-list").text
    revise.click()
    _wait(driver, lambda d: d.find_element("id", "revising").is_displayed())
    assert _item(driver)["id"] == first["id"]
    _press(driver, "n")
    _wait(driver, lambda d: d.find_element("id", "message").text == "Revised: no answer.")
    assert [(d["reviewer"], d["action"]) for d in db.decisions()] == [("ana", "no_answer"), ("bo", "span"),
                                                                       ("bo", "no_answer")]

    # the layout on a phone and on a wide screen: nothing runs off the side
    target = os.environ.get("TORCHTUNE_BLAH_SCREENSHOT_DIR")
    _sign_in(driver, url, tokens["cy"])
    for width, height in ((390, 844), (1600, 1000)):
        driver.set_window_size(width, height)
        _wait(driver, lambda d: d.execute_script("return window.innerWidth") <= width)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (width, overflow)
        header = driver.execute_script("return document.querySelector('header').getBoundingClientRect().right")
        assert header <= width
        shot = tmp_path / f"review_page_{width}.png"
        driver.save_screenshot(str(shot))
        assert _not_blank(shot)
        if target:
            from PIL import Image

            os.makedirs(target, exist_ok=True)
            Image.open(shot).convert("RGB").quantize(colors=64).save(os.path.join(target, shot.name), optimize=True)


def test_offsets_after_an_emoji_are_code_points_on_the_page(server, browser, tmp_path):  # noqa: F811
    """JavaScript counts UTF-16 units, Python code points: the page converts both ways, so the
    highlight and a span selected after an emoji, a combining accent and CJK land where they are."""
    db, url, tokens = server
    context = "🙂 Les cafés de 東京: the Café Noir (e\u0301 with a combining accent) opened in 1923 😀 and closed in 1971."
    source = tmp_path / "utf.jsonl"
    source.write_text(json.dumps({"id": "q-utf", "title": "Cafés", "context": context, "question": "Which café?",
                                  "model_answer": "Café Noir", "prediction": "Café Noir", "na_prob": 0.2,
                                  "raw_output": '{"answer": "Café Noir"}', "run_dir": "/runs/x", "stage": "lora"},
                                 ensure_ascii=False) + "\n", encoding="utf-8")
    assert review_cli(["import", "--db", db.path, str(source)]) == 0
    driver = browser
    _sign_in(driver, url, tokens["ana"])
    assert driver.find_element("tag name", "mark").text == "Café Noir"
    for answer in ("1923", "1971"):
        driver.execute_script("""
            const box = document.getElementById('context'), word = arguments[0];
            const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
            let node;
            while ((node = walker.nextNode())) {
              const at = node.data.indexOf(word);
              if (at >= 0) {
                const range = document.createRange();
                range.setStart(node, at); range.setEnd(node, at + word.length);
                const selection = window.getSelection();
                selection.removeAllRanges(); selection.addRange(range);
                return;
              }
            }""", answer)
        _wait(driver, lambda d: d.find_element("id", "selected").text == f'"{answer}"')
    driver.find_element("id", "use-selection").click()
    _saved(driver, "")
    decision = db.decisions()[-1]
    assert decision["answer"] == "1971" and decision["answer_start"] == context.index("1971"), decision
