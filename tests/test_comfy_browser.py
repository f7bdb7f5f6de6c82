"""What a new user sees in ComfyUI's own UI, in a real browser: headless Chromium driven by Selenium against a
ComfyUI server with the pack (tests/comfy_server.py, tiny SD1.5 weights).

The UI is the frontend the ComfyUI under test pins in its requirements.txt: 1.27.10 for ComfyUI 0.3.64 (the
`test` extra installs it), 1.49.6 for ComfyUI 0.33.0. A virtualenv holds one comfyui-frontend-package, so when the
installed one is not the pin, the server fixture installs the pinned wheel from PyPI (`pip install --no-deps
--target`, about 85 MB, once) into pytest's cache folder (.pytest_cache/d/comfyui-frontend/, or
$EFFICIENT_ATTENTION_POP_FRONTEND_CACHE) and starts ComfyUI with `--front-end-root` pointing at it
(comfy_server.pinned_frontend). The two frontends differ in their markup; where they do, the helpers below accept
either (template browser: 1.49.6 lists a pack's workflows under the pack's name in its side bar; node search: a
new list, and the added node follows the pointer until a click places it; queue: a job-queue overlay instead of a
side panel; errors: an overlay naming the failed node, its "View details" opening the error panel, instead of a
dialog). The workflow-templates package (ComfyUI's own templates) is not needed by either: the pack's examples are
served from its example_workflows/ folder.

Checked: the example workflows in the template browser (cards with their titles and thumbnails) and loaded into
the canvas without errors about the node; the node's rank in the canvas search box for the words people type
(search_ranks.json), the node added, its widgets in order with their tooltips (hovered on the canvas, and in the
UI's node definition), its face (node_face.json: where ComfyUI folds advanced inputs, the Nodes 2.0 view shows
FRONT and the rest after "Show advanced inputs"; the classic canvas, like ComfyUI's own nodes, shows every widget); a workflow with the node
queued with the Run button and finished; heads=7 answered by the error dialog naming the node, the server still
running the next valid workflow.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and the `browser` extra
(selenium; spandrel, which ComfyUI's UpscaleModelLoader imports: without that node, frontend 1.27.10 fails to
build any loader with a ckpt_name or vae_name widget). Screenshots of each stage go to a temporary folder, or to
$EFFICIENT_ATTENTION_POP_SCREENSHOTS when set, with search_ranks.json (the node's rank per search).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
import time
import urllib.parse

import pytest

from comfy_server import PACK_FOLDER, serve_tiny_sd15, txt2latent_workflow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
SCREENSHOTS_ENV = "EFFICIENT_ATTENTION_POP_SCREENSHOTS"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
NODE_TITLE = "Efficient Attention (PoP)"
NODE = dict(backend="sdpa", downsample=2, window=16, max_error=0.0, strength=1.0, apply_to="both", min_tokens=0,
            start_percent=0.0, end_percent=1.0, mask_mode="isolate regions", heads=0, layernorm=False)
OUR_NODE_ID = 6  # txt2latent_workflow's id for the node


def missing_browser_parts():
    """What this machine lacks for the browser test, in words (empty when nothing)."""
    missing = [f"{path} (apt-get install chromium chromium-driver)" for path in (CHROMIUM, CHROMEDRIVER)
               if not os.path.exists(path)]
    missing += [f"{module} (pip install -e '.[browser]')" for module in ("selenium", "spandrel")
                if importlib.util.find_spec(module) is None]
    return missing


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    missing = missing_browser_parts()
    if missing:
        pytest.skip("the browser test needs " + ", ".join(missing))
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    frontends = str(cache.mkdir("comfyui-frontend") if cache else tmp_path_factory.mktemp("comfyui-frontend"))
    yield from serve_tiny_sd15(tmp_path_factory, "browser test", frontend_cache=frontends)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get(SCREENSHOTS_ENV) or str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server):
    """Headless Chromium with ComfyUI's UI loaded (a fresh profile and a fresh ComfyUI user: a first start)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", VIEWPORT)
        driver.get(server.url)
        wait_for(driver, "return !!(window.app && app.graph && app.canvas && window.LiteGraph "
                         "&& LiteGraph.registered_node_types.EfficientAttentionPoP)", "the UI to start")
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script, what, timeout=60.0, args=()):
    """Poll a JavaScript condition (with ``args`` as its arguments) until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def shoot(driver, shots, name):
    time.sleep(0.5)  # the canvas draws on the next animation frame
    driver.save_screenshot(os.path.join(shots, name))


QUEUE_BUTTON = ".queue-tab-button, [data-testid=queue-overlay-toggle]"  # 1.27.10's side bar tab, 1.49.6's overlay
QUEUE_PANEL = ".sidebar-content-container, [data-testid=queue-progress-overlay]"
DIALOGS = ".p-dialog, [role=dialog]"
DIALOG_CLOSE = ".p-dialog button[aria-label=Close], [role=dialog] button[aria-label='Close dialog']"


def shoot_with_queue_panel(driver, shots, name):
    """A screenshot with the queue panel open (the finished runs, with their times); closed again after."""
    driver.find_element("css selector", QUEUE_BUTTON).click()
    wait_for(driver, "return [...document.querySelectorAll(arguments[0])].some(p => /\\d+\\.\\d+s/.test(p.innerText))",
             "the queue panel's runs", 10, [QUEUE_PANEL])
    shoot(driver, shots, name)
    driver.find_element("css selector", QUEUE_BUTTON).click()


def close_dialogs(driver):
    driver.execute_script("document.querySelectorAll(arguments[0]).forEach(b => b.click())", DIALOG_CLOSE)
    wait_for(driver, "return !document.querySelector(arguments[0])", "the dialogs to close", 10, [DIALOGS])


def new_graph(driver, api_workflow=None):
    """An empty canvas, or ``api_workflow`` (API format) laid out as the frontend lays out a pasted API workflow."""
    close_dialogs(driver)
    if api_workflow is None:
        driver.execute_script("app.graph.clear(); app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1;")
    else:
        driver.execute_script("app.loadApiJson(arguments[0], 'tiny sd15'); app.canvas.ds.offset = [0, 0]; "
                              "app.canvas.ds.scale = 0.75;", api_workflow)
    driver.execute_script("app.canvas.setDirty(true, true)")


def move_mouse(driver, x, y):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(x), int(y))
    actions.perform()


def screen_point(driver, graph_x, graph_y):
    """Page coordinates of a point of the graph."""
    return driver.execute_script(
        "const box = app.canvas.canvas.getBoundingClientRect(); "
        "const [x, y] = app.canvas.ds.convertOffsetToCanvas([arguments[0], arguments[1]]); "
        "return [box.left + x / devicePixelRatio, box.top + y / devicePixelRatio];", graph_x, graph_y)


def hover_tooltip(driver, graph_x, graph_y):
    """The canvas tooltip shown after the pointer rests on a point of the graph."""
    x, y = screen_point(driver, graph_x, graph_y)
    move_mouse(driver, x - 2, y)
    move_mouse(driver, x, y)  # the tooltip timer starts on a mouse move over the canvas
    return wait_for(driver, "const tip = document.querySelector('.node-tooltip'); return tip && tip.innerText",
                    f"a tooltip at {graph_x, graph_y}", 10)


SEARCH_PLACEHOLDERS = ("Search Nodes...", "Add a node...")  # frontend 1.27.10, 1.49.6
SEARCH_OPTIONS = ("li.p-autocomplete-option", "[data-testid=result-item]")
SEARCH_TITLES = ("const old = [...document.querySelectorAll('li.p-autocomplete-option')]; "  # 1.27.10: aria-label
                 "if (old.length) return old.map(o => o.getAttribute('aria-label')); "
                 "return [...document.querySelectorAll('[data-testid=result-item]')]"  # 1.49.6: the first line's text
                 ".map(o => o.querySelector('span.truncate').innerText);")


def search_results(driver, text):
    """Open the node search box on the empty canvas, type ``text``; the result titles in order."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("css selector", "canvas#graph-canvas")
    ActionChains(driver).move_to_element(canvas).double_click().perform()
    box = driver.switch_to.active_element
    assert box.get_attribute("placeholder") in SEARCH_PLACEHOLDERS, "the double-click did not open the node search"
    time.sleep(0.5)
    popular = driver.execute_script(SEARCH_TITLES)  # before the query is applied the box lists popular nodes
    box.send_keys(text)
    # the query applied: highlighted matches in a title, or (a match by a search alias only, or no match) a list
    # that is no longer the popular one
    try:
        wait_for(driver, "return document.querySelector(arguments[0]) || JSON.stringify(eval(arguments[1])) !== "
                         "JSON.stringify(arguments[2])", f"search results for {text!r}", 10,
                 [", ".join(f"{option} .highlight" for option in SEARCH_OPTIONS), f"(() => {{{SEARCH_TITLES}}})()",
                  popular])
    except AssertionError:
        return box, []
    titles = None
    while True:  # the list settles once the (debounced) search has run
        time.sleep(0.5)
        latest = driver.execute_script(SEARCH_TITLES)
        if latest == titles:
            return box, titles
        titles = latest


def history_ids(server):
    return set(server.get("/history"))


def run_from_ui(driver, server, timeout=180.0):
    """Click the Run button; the /history entry of the prompt it queued, once finished."""
    before = history_ids(server)
    driver.find_element("xpath", "//button[normalize-space()='Run']").click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = history_ids(server) - before
        if new:
            (prompt_id,) = new
            entry = server.get(f"/history/{prompt_id}")[prompt_id]
            if entry.get("status", {}).get("completed") is not None:
                return entry
        time.sleep(0.25)
    raise AssertionError(f"no run finished within {timeout:.0f} s:\n{server.log_tail()}")


def missing_models_notice(driver):
    """Where the UI lists a loaded workflow's missing model files: 1.27.10's Missing Models dialog; in 1.49.6 the
    error overlay, whose "View details" opens the error panel's Missing Models group. Its text."""
    shown = wait_for(driver, "const d = [...document.querySelectorAll('.p-dialog')]"
                             ".find(d => d.innerText.startsWith('Missing Models')); if (d) return ['dialog', d.innerText]; "
                             "const o = document.querySelector('[data-testid=error-overlay]'); "
                             "return o && ['overlay', o.innerText];", "the missing models notice", 10)
    if shown[0] == "dialog":
        return shown[1]
    driver.find_element("xpath", "//*[@data-testid='error-overlay']//button[normalize-space()='View details']").click()
    return wait_for(driver, "const e = document.querySelector('[data-testid=error-group-missing-model]'); "
                            "return e && e.innerText", "the error panel's missing models", 10)


def error_report(driver):
    """The text the UI shows for a failed run: 1.27.10's error dialog; in 1.49.6 the overlay naming the failed node
    (its title is checked here) and the error panel its "View details" opens."""
    shown = wait_for(driver, "const d = document.querySelector('.p-dialog'); if (d) return ['dialog', d.innerText]; "
                             "const o = document.querySelector('[data-testid=error-overlay]'); "
                             "return o && ['overlay', o.innerText];", "the error dialog or overlay", 20)
    if shown[0] == "dialog":
        return shown[1]
    assert f"{NODE_TITLE} failed" in shown[1], shown[1]
    driver.find_element("xpath", "//*[@data-testid='error-overlay']//button[normalize-space()='View details']").click()
    return wait_for(driver, "const e = document.querySelector('[data-testid=error-group-execution]'); "
                            "return e && /Exception/.test(e.innerText) && e.innerText", "the error panel", 10)


def our_node_widgets(driver, node_id):
    return driver.execute_script("return app.graph.getNodeById(arguments[0]).widgets.map(w => [w.name, w.value])",
                                 node_id)


def test_template_browser_shows_the_examples(page, server, shots):
    """On a first start ComfyUI opens its template browser; the pack's examples are cards there, titled by their
    file names, with the .jpg beside each as thumbnail."""
    names = [os.path.splitext(os.path.basename(path))[0] for path in EXAMPLES]
    if not page.execute_script("return !!document.querySelector('[data-testid=template-workflows-content], "
                               "[data-testid=manage-node-templates-dialog]')"):
        page.execute_script("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    cards = {name: f'[data-testid="template-workflow-{name}"]' for name in names}
    # 1.49.6 opens on ComfyUI's own templates (a package not installed here: none) and lists each pack that has
    # templates by its folder name in the side bar; a user clicks it. 1.27.10 shows the pack's cards at once.
    wait_for(page, "return document.querySelector(arguments[0]) || [...document.querySelectorAll("
                   "'[role=dialog] [role=button], [role=dialog] button')].some(e => e.innerText.trim() === arguments[1])",
             "the template browser", 30, [next(iter(cards.values())), PACK_FOLDER])
    if not page.execute_script("return document.querySelector(arguments[0])", next(iter(cards.values()))):
        page.find_element("xpath", f"//*[@role='dialog']//*[@role='button' or self::button]"
                                   f"[normalize-space()='{PACK_FOLDER}']").click()
    wait_for(page, "return arguments[0].every(c => { const img = document.querySelector(c + ' img'); "
                   "return img && img.complete && img.naturalWidth > 0; })", "the example cards' thumbnails", 30,
             [list(cards.values())])
    for name, card in cards.items():
        text = page.find_element("css selector", card).text
        assert name in text.replace("\n", " "), text
    assert sorted(server.get("/workflow_templates")[PACK_FOLDER]) == sorted(names)
    shoot(page, shots, "01_template_browser.png")


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_loads_without_errors(page, server, shots, path):
    """Each example, fetched and loaded as its card does (in 1.27.10 the card itself loads nothing here: it waits for
    the core templates, a package the tests do not install), keeps our node's values and raises no error; the only
    notice is the UI's list of the missing model files (the tiny server has none of them), naming every file of the
    loaders' properties.models, so a user is offered their downloads."""
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    close_dialogs(page)
    page.get_log("browser")  # start the log afresh
    page.execute_async_script(
        "const [url, name, done] = arguments; fetch(url).then(r => r.json())"
        ".then(graph => app.loadGraphData(graph, true, true, name)).then(() => done(true))",
        f"{server.url}/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}.json", name)
    time.sleep(1)
    models = [model["name"] for node in saved["nodes"] for model in node.get("properties", {}).get("models", [])]
    if models:
        listed = missing_models_notice(page)
        assert all(model in listed for model in models), (models, listed)
    # no other notice, e.g. the workflow schema's validation warnings (toasts) or an error group of 1.49.6's panel
    others = page.execute_script(
        "return [...document.querySelectorAll('.p-toast-message, .p-dialog, section[data-testid^=error-group-]')]"
        ".filter(e => !(e.matches('.p-dialog') && e.innerText.startsWith('Missing Models')) "
        "&& e.getAttribute('data-testid') !== 'error-group-missing-model').map(e => e.innerText)")
    assert not others, others
    if not models:
        assert not page.execute_script("return document.querySelector('[data-testid=error-overlay]')")
    # network failures are not the pack's: the model URLs' download sizes (fetched by 1.27.10's Missing Models
    # dialog) cannot be had offline
    errors = [entry["message"] for entry in page.get_log("browser") if entry["level"] == "SEVERE"
              and "Failed to load resource" not in entry["message"]
              and "Error fetching file size" not in entry["message"]]
    assert not errors, errors
    for node in (n for n in saved["nodes"] if n["type"] == "EfficientAttentionPoP"):
        assert [value for _, value in our_node_widgets(page, node["id"])] == node["widgets_values"]
    shoot(page, shots, f"02_example_{name}.png")


SEARCH_WORDS = ("efficient attention", "attention", "sage", "flash", "sparse", "region", "mask attention", "faster")


def test_search_ranks(page, server, shots):
    """The node's rank in the node search for the words people type: recorded in search_ranks.json (with the
    frontend's version and the first results), "efficient attention" first everywhere. Frontend 1.27.10 searches
    the name and display name only; 1.49.6 also the search aliases (ComfyUI 0.33.0 sends them), so there every word
    finds the node. Its order comes from the name and display name and how often a node is used, not the aliases:
    for a word outside "Efficient Attention (PoP)" the node is listed after the nodes whose names hold the word."""
    from selenium.webdriver.common.keys import Keys

    from comfy_server import pinned_frontend_version

    ranks, results = {}, {}
    for text in SEARCH_WORDS:
        new_graph(page)
        box, titles = search_results(page, text)
        ranks[text] = titles.index(NODE_TITLE) + 1 if NODE_TITLE in titles else None
        results[text] = titles[:12]
        box.send_keys(Keys.ESCAPE)
    aliases = bool(server.get("/object_info/EfficientAttentionPoP")["EfficientAttentionPoP"].get("search_aliases"))
    with open(os.path.join(shots, "search_ranks.json"), "w") as f:
        json.dump({"frontend": pinned_frontend_version(), "search_aliases_sent": aliases, "ranks": ranks,
                   "first_results": results}, f, indent=1)
    assert ranks["efficient attention"] == 1 and ranks["attention"] is not None, ranks
    if aliases:
        assert all(rank is not None for rank in ranks.values()), ranks


def comfyui_folds(server):
    """Whether this ComfyUI folds advanced inputs: its own VAEDecodeTiled marks tile_size advanced (0.33.0) or not
    (0.3.64)."""
    tiled = server.get("/object_info/VAEDecodeTiled")["VAEDecodeTiled"]["input"]["required"]
    return bool(tiled["tile_size"][1].get("advanced"))


def visible_widgets(driver, node_id):
    """The widgets the classic canvas draws on the node (1.27.10 has no isWidgetVisible: all but hidden ones)."""
    return driver.execute_script(
        "const n = app.graph.getNodeById(arguments[0]); "
        "return n.widgets.filter(w => n.isWidgetVisible ? n.isWidgetVisible(w) : !w.hidden).map(w => w.name)", node_id)


def shoot_node(driver, shots, name, node_id, margin=24):
    """A screenshot of the classic canvas cropped to the node (with its title), small enough for the docs."""
    from PIL import Image

    shoot(driver, shots, name)
    left, top, right, bottom = driver.execute_script(
        "const n = app.graph.getNodeById(arguments[0]); const box = app.canvas.canvas.getBoundingClientRect(); "
        "const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]); "
        "const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]); "
        "return [box.left + x0 / devicePixelRatio, box.top + y0 / devicePixelRatio, "
        "box.left + x1 / devicePixelRatio, box.top + y1 / devicePixelRatio];", node_id)
    path = os.path.join(shots, name)
    with Image.open(path) as image:
        box = (max(0, int(left) - margin), max(0, int(top) - margin), min(image.width, int(right) + margin),
               min(image.height, int(bottom) + margin))
        image.crop(box).save(path, optimize=True)


VUE_NODES = "Comfy.VueNodes.Enabled"  # 1.49.6's "Modern Node Design (Nodes 2.0)"; the classic canvas is the default


def set_setting(driver, name, value):
    driver.execute_async_script("const [name, value, done] = arguments; "
                                "app.extensionManager.setting.set(name, value).then(() => done(true))", name, value)


def vue_node(driver, node_id):
    return wait_for(driver, "return document.querySelector(`[data-node-id=\"${arguments[0]}\"]`)",
                    "the node drawn as Nodes 2.0", 10, [node_id])


def vue_widget_labels(driver, node_id):
    """The widget rows Nodes 2.0 shows on the node, by their labels."""
    return driver.execute_script(
        "return [...arguments[0].querySelectorAll('.lg-node-widget')].filter(r => r.offsetParent !== null)"
        ".map(r => r.innerText.split('\\n')[0].trim())", vue_node(driver, node_id))


def test_search_box_finds_the_node_and_adds_it(page, server, shots):
    """Added through the search box: its widgets in their saved order; where ComfyUI folds advanced inputs, the
    node shows FRONT and folds the rest until "Show Advanced", elsewhere every widget shows; the hover tooltips."""
    from selenium.webdriver.common.keys import Keys

    from efficient_attention_pop.nodes.efficient_attention import DESCRIPTION, FRONT, INPUTS

    new_graph(page)
    box, titles = search_results(page, "attention")
    for _ in range(titles.index(NODE_TITLE)):
        box.send_keys(Keys.ARROW_DOWN)  # the highlighted result is previewed beside the list
    shoot(page, shots, "03_search_attention.png")
    box.send_keys(Keys.ENTER)
    node_id = wait_for(page, "const n = app.graph.nodes.find(n => n.type === 'EfficientAttentionPoP'); "
                             "return n && n.id", "the node to be added", 10)
    if page.execute_script("return !!app.graph.getNodeById(arguments[0]).flags.ghost", node_id):
        from selenium.webdriver.common.action_chains import ActionChains

        move_mouse(page, *screen_point(page, 300, 150))  # 1.49.6: the node follows the pointer until a click
        ActionChains(page).click().perform()
        wait_for(page, "return !app.graph.getNodeById(arguments[0]).flags.ghost", "the node to be placed", 10,
                 [node_id])
    assert [name for name, _ in our_node_widgets(page, node_id)] == [name for name, *_ in INPUTS]
    definition = page.execute_script("const d = LiteGraph.registered_node_types.EfficientAttentionPoP.nodeData; "
                                     "return [d.description, Object.fromEntries(Object.entries(d.inputs)"
                                     ".map(([name, input]) => [name, input.tooltip]))]")
    assert definition[0] == DESCRIPTION
    assert all(definition[1][name] == tooltip for name, _, _, tooltip in INPUTS)
    assert definition[1]["mask"] and definition[1]["model"]

    page.execute_script("const n = app.graph.getNodeById(arguments[0]); n.pos = [300, 150]; "
                        "app.canvas.deselectAll(); app.canvas.setDirty(true, true);", node_id)
    # the classic canvas (the default in both frontends) draws every widget, as it does ComfyUI's own nodes'
    # advanced ones (1.49.6 folds those only in Nodes 2.0 and in the side panel)
    names = [name for name, *_ in INPUTS]
    shown = visible_widgets(page, node_id)
    assert shown == names
    sockets = page.execute_script("return app.graph.getNodeById(arguments[0]).inputs.filter(i => !i.widget)"
                                  ".map(i => i.name)", node_id)
    assert sockets == ["model", "mask"], sockets
    face = {"classic_canvas": shown}
    if comfyui_folds(server):  # Nodes 2.0: FRONT, the rest behind the node's "Show advanced inputs"
        set_setting(page, VUE_NODES, True)
        try:
            front = [name for name in names if name in FRONT]
            deadline = time.monotonic() + 10
            while vue_widget_labels(page, node_id) != front and time.monotonic() < deadline:
                time.sleep(0.25)
            face["nodes_2_default"] = vue_widget_labels(page, node_id)
            assert face["nodes_2_default"] == front
            node = vue_node(page, node_id)
            time.sleep(0.5)
            node.screenshot(os.path.join(shots, "04_node_default_face.png"))
            node.find_element("css selector", "[data-testid=advanced-inputs-button]").click()
            wait_for(page, "return app.graph.getNodeById(arguments[0]).showAdvanced", "the advanced inputs", 10,
                     [node_id])
            deadline = time.monotonic() + 10
            while vue_widget_labels(page, node_id) != names and time.monotonic() < deadline:
                time.sleep(0.25)
            face["nodes_2_unfolded"] = vue_widget_labels(page, node_id)
            assert face["nodes_2_unfolded"] == names
            time.sleep(0.5)
            vue_node(page, node_id).screenshot(os.path.join(shots, "05_node_advanced_unfolded.png"))
        finally:
            set_setting(page, VUE_NODES, False)
        page.execute_script("app.canvas.setDirty(true, true)")
    else:
        shoot_node(page, shots, "04_node_default_face.png", node_id)
    with open(os.path.join(shots, "node_face.json"), "w") as f:
        json.dump(face, f, indent=1)
    heads_x, heads_y = page.execute_script(
        "const n = app.graph.getNodeById(arguments[0]); const w = n.widgets.find(w => w.name === 'heads'); "
        "return [n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + 10];", node_id)
    heads_tooltip = next(tooltip for name, _, _, tooltip in INPUTS if name == "heads")
    assert hover_tooltip(page, heads_x, heads_y) == heads_tooltip
    shoot(page, shots, "06_node_widgets_heads_tooltip.png")
    title_x, title_y = page.execute_script("const n = app.graph.getNodeById(arguments[0]); "
                                           "return [n.pos[0] + 60, n.pos[1] - 15];", node_id)
    assert hover_tooltip(page, title_x, title_y) == DESCRIPTION


def test_run_button_runs_a_workflow_with_the_node(page, server, shots):
    new_graph(page, txt2latent_workflow(NODE, prefix="browser"))
    entry = run_from_ui(page, server)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert server.saved_latent(entry).shape == (1, 4, 8, 8)
    shoot_with_queue_panel(page, shots, "07_run_finished.png")


def test_error_dialog_names_the_node_and_the_server_goes_on(page, server, shots):
    new_graph(page, txt2latent_workflow(NODE, seed=1, prefix="browser"))
    page.execute_script("const n = app.graph.getNodeById(arguments[0]); "
                        "n.widgets.find(w => w.name === 'heads').value = 7;", OUR_NODE_ID)  # divides none of 320
    entry = run_from_ui(page, server)
    assert entry["status"]["status_str"] == "error", entry["status"]
    report = error_report(page)
    assert NODE_TITLE in report and "Mismatch in tensor dimensions" in report, report
    shoot(page, shots, "08_error_dialog.png")

    close_dialogs(page)
    page.execute_script("const n = app.graph.getNodeById(arguments[0]); "
                        "n.widgets.find(w => w.name === 'heads').value = 0;", OUR_NODE_ID)
    after = run_from_ui(page, server)
    assert after["status"]["status_str"] == "success" and server.process.poll() is None
    shoot_with_queue_panel(page, shots, "09_valid_run_after_the_error.png")
