"""The web demo, `compose --ui`: train people from uploaded photos, compose them into group
photos with a live pose preview, and see every face scored. gradio loads only on launch.

The demo is the one place that drives all three stages, so it reads eval's public names
(lazily, when something is scored), the one exception to compose never importing eval.
Uploads are checked (type, size, count) and copied into a private temporary folder,
never beside the library; the library only ever receives what `train_persona` commits.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from personas import DEFAULT_BASE_MODEL, DEFAULT_CONTROLNET, GroupshotError, Library, TrainConfig, validate_name

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
POSE_SUFFIXES = PHOTO_SUFFIXES + (".json",)
UPLOADED_POSE = "uploaded file"
# Elements the browser test (and anyone scripting the page) finds by id.
IDS = ("people-table", "persona-select", "persona-card", "persona-loss", "persona-refs", "train-name",
       "train-class", "train-photos", "train-method", "train-lr", "train-steps", "train-resolution",
       "train-button", "train-status", "compose-people", "compose-pose", "compose-pose-file", "pose-preview", "pose-note",
       "compose-prompt", "compose-negative", "compose-method", "compose-seed", "compose-steps", "compose-images",
       "compose-width", "compose-height", "compose-button", "compose-gallery", "compose-status",
       "compose-scores", "score-run", "score-button", "score-summary", "score-images", "score-faces")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DemoSettings:
    """What the demo uses and its forms start with; `compose --ui --ui-config FILE` reads
    these keys from a TOML file, and TrainConfig fields from its [train] table."""

    face_model: str = _f("auto", "face model for photo checks and scores: auto (arcface where its pack is present, "
                                 "else dlib, named on every score), arcface or dlib")
    clip_model: str = _f("ViT-B-32", "open_clip architecture or local-dir:FOLDER for CLIP scores")
    clip_pretrained: str | None = _f("openai", "open_clip weights tag or checkpoint file")
    render_size: tuple[int, int] = _f((512, 512), "(width, height) of renders")
    render_steps: int = _f(30, "denoising steps per render")
    num_images: int = _f(2, "images per render")
    max_photos: int = _f(30, "most photos one training upload may hold")
    max_upload_mb: float = _f(20.0, "largest upload file in MB")
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training defaults ([train] table)"})

    def __post_init__(self) -> None:
        if self.face_model not in ("auto", "arcface", "dlib"):
            raise GroupshotError(f"face_model {self.face_model!r}: choose auto, arcface or dlib")
        try:
            width, height = (int(v) for v in self.render_size)
        except (TypeError, ValueError):
            raise GroupshotError(f"render_size {self.render_size!r}: expected [width, height]") from None
        self.render_size = (width, height)
        for name, minimum in (("render_steps", 1), ("num_images", 1), ("max_photos", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise GroupshotError(f"{name} {value!r}: must be a whole number >= {minimum}")
        if not isinstance(self.max_upload_mb, (int, float)) or not 0 < self.max_upload_mb <= 1024:
            raise GroupshotError(f"max_upload_mb {self.max_upload_mb!r}: must be a number of MB in (0, 1024]")

    @classmethod
    def from_toml(cls, path: str | os.PathLike, *, base_model: str | None = None) -> "DemoSettings":
        from personas import read_toml

        path = Path(path)
        data = read_toml(path, f"--ui-config {path}")
        train = data.pop("train", {})
        known = {f.name for f in dataclasses.fields(cls)} - {"train"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GroupshotError(f"--ui-config {path}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not isinstance(train, dict):
            raise GroupshotError(f"--ui-config {path}: [train] must be a table of TrainConfig fields")
        config = TrainConfig.from_dict({**train, **({"base_model": base_model} if base_model else {})}, source=str(path))
        return cls(**data, train=config)


def check_uploads(files: Sequence[str | os.PathLike] | None, into: Path, *, what: str, suffixes: Sequence[str],
                  max_files: int, max_mb: float, min_files: int = 1) -> list[Path]:
    """Uploaded files, checked (count, type by name and content, size) and copied into
    `into`, a fresh folder; anything wrong is refused as a whole with the reason."""
    from personas import open_photo

    files = [Path(f) for f in (files or [])]
    if len(files) < min_files:
        raise GroupshotError(f"{what}: {len(files)} file(s) uploaded; give at least {min_files}")
    if len(files) > max_files:
        raise GroupshotError(f"{what}: {len(files)} files uploaded; at most {max_files} at a time")
    into.mkdir(parents=True, exist_ok=False)
    out = []
    for i, f in enumerate(files):
        suffix = f.suffix.lower()
        if suffix not in suffixes:
            raise GroupshotError(f"{what}: {f.name} is not a {', '.join(s.lstrip('.') for s in suffixes)} file")
        size = f.stat().st_size
        if size > max_mb * 2**20:
            raise GroupshotError(f"{what}: {f.name} is {size / 2**20:.1f} MB; the limit is {max_mb:g} MB")
        if size == 0:
            raise GroupshotError(f"{what}: {f.name} is empty")
        if suffix != ".json":
            open_photo(f)  # decodes it: a renamed or damaged file is refused by name
        # Our own file name: an upload's name never decides where anything is written.
        target = into / f"{i:03d}{suffix}"
        shutil.copyfile(f, target)
        out.append(target)
    return out


class Demo:
    """The demo's state and actions, free of gradio: one library, one composer (models load on
    the first render and stay), and a private folder for uploads."""

    def __init__(self, settings: DemoSettings, *, base_model: str = DEFAULT_BASE_MODEL,
                 controlnet: str = DEFAULT_CONTROLNET, library: str | os.PathLike | None = None,
                 out: str | os.PathLike = "renders", device: str | None = None):
        self.settings = settings
        self.base_model, self.controlnet = base_model, controlnet
        self.library = Library(library)
        self.out = Path(out)
        self.device = device
        self.uploads = Path(tempfile.mkdtemp(prefix="groupshot-ui-"))
        atexit.register(shutil.rmtree, self.uploads, ignore_errors=True)
        self._composer: Any = None
        self._face_backend: Any = None
        self._clip: Any = None
        self._clip_error: str | None = None
        self._lock = threading.Lock()  # one model job at a time: training, rendering, scoring

    # -- people --------------------------------------------------------------------------

    def people_rows(self) -> list[list[str]]:
        rows = []
        for name in self.library.names():
            try:
                p = self.library.load(name, verify=False)
            except GroupshotError as e:
                rows.append([name, "BROKEN", str(e)[:60], "", ""])
                continue
            rows.append([name, p.method, p.prompt_words(), str(len(p.photos)), p.created_at[:19]])
        return rows

    def card(self, name: str | None) -> tuple[str, Any, list[Any]]:
        """A persona's card (markdown), its loss curve and its reference photos."""
        from PIL import Image

        if not name:
            return "Pick a person, or train one.", None, []
        p = self.library.load(name, verify=False)
        hp, ex = p.hyperparameters, p.extra
        rows = [("prompt words", f"`{p.prompt_words()}`"), ("method", p.method),
                ("learning rate", hp.get("learning_rate")), ("steps", hp.get("max_train_steps")),
                ("rank / alpha", f"{hp.get('lora_rank')} / {hp.get('lora_alpha') or hp.get('lora_rank')}"),
                ("tokens", f"`{' '.join(p.tokens)}`" if p.tokens else "-"), ("base model", f"`{p.base_model.get('id')}`"),
                ("reference photos", len(p.photos)), ("final loss", ex.get("final_loss")),
                ("training time", f"{ex.get('total_seconds')} s on {ex.get('device')}" if "total_seconds" in ex else "-"),
                ("trained", p.created_at)]
        if "imported" in ex:
            rows.append(("imported from", ", ".join(v["file"] for v in ex["imported"].values())))
        text = f"### {p.name}\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in rows)
        loss = p.path / "train" / "loss.png"
        refs = [Image.open(f).convert("RGB") for f in p.ref_paths if f.is_file()]
        return text, (Image.open(loss).convert("RGB") if loss.is_file() else None), refs

    def train(self, name: str, class_word: str, files: Sequence[str] | None, *, method: str, learning_rate: float,
              steps: int, resolution: int) -> str:
        """Check the form and the uploads, then train (the caller shows tqdm's progress)."""
        from personas import train_persona

        name = validate_name((name or "").strip())
        if self.library.exists(name):
            raise GroupshotError(f"{name!r} is already in the library; pick another name (or `personas remove {name}`)")
        config = dataclasses.replace(
            self.settings.train, base_model=self.base_model, class_word=(class_word or "").strip() or "person",
            method=method, learning_rate=float(learning_rate), max_train_steps=_whole(steps, "steps"),
            resolution=_whole(resolution, "resolution"),
        )  # replace() runs TrainConfig's checks again
        folder = self.uploads / f"photos-{uuid.uuid4().hex[:8]}"
        photos = check_uploads(files, folder, what="photos", suffixes=PHOTO_SUFFIXES,
                               max_files=self.settings.max_photos, max_mb=self.settings.max_upload_mb,
                               min_files=config.min_photos)
        try:
            with self._lock:
                result = train_persona(name, photos, config, library=self.library, restart=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return (f"trained {name}: {result.steps} steps, final loss {result.final_loss:.4f}, "
                f"{result.steps_per_second:.2f} steps/s; in prompts: `{result.persona.prompt_words()}`")

    # -- compose -------------------------------------------------------------------------

    def pose_spec(self, choice: str | None, upload: str | None) -> str | None:
        if choice == UPLOADED_POSE:
            if not upload:
                raise GroupshotError("pose: upload a skeleton image, OpenPose JSON or photo, or pick a template")
            folder = self.uploads / f"pose-{uuid.uuid4().hex[:8]}"
            return str(check_uploads([upload], folder, what="pose", suffixes=POSE_SUFFIXES, max_files=1,
                                     max_mb=self.settings.max_upload_mb)[0])
        return choice or None

    def preview(self, people: Sequence[str], pose: str | None, size: tuple[int, int]) -> tuple[Any, str]:
        """The skeleton and the people's masks side by side (no model), names on the masks,
        and a note while the number of people picked differs from the pose's."""
        from PIL import Image

        from compose import assign_people, draw_pose, load_pose, regions_from_pose

        if not pose:
            return None, ""
        # Drawn at least 384 px high: a preview of a small render would be a thumbnail.
        scale = max(1.0, 384 / size[1])
        loaded = load_pose(pose, size=(round(size[0] * scale), round(size[1] * scale)))
        regions = regions_from_pose(loaded)
        n = len(loaded.people)
        names = [f"person {i + 1}" for i in range(n)]
        note = f"The pose has {n} {'person' if n == 1 else 'people'}; {len(people)} picked."
        if len(people) == n:
            note = ""
            for name, index in zip(people, assign_people(loaded, list(people))):
                names[index] = name
        skeleton = draw_pose(loaded)
        both = Image.new("RGB", (2 * skeleton.width, skeleton.height))
        both.paste(skeleton, (0, 0))
        both.paste(regions.overlay(skeleton, names), (skeleton.width, 0))
        return both, note

    def composer(self) -> Any:
        from compose import GroupComposer

        if self._composer is None:
            self._composer = GroupComposer.from_pretrained(self.base_model, self.controlnet, device=self.device,
                                                           library=self.library)
        return self._composer

    def render(self, people: Sequence[str], pose: str | None, prompt: str, *, negative_prompt: str = "",
               method: str = "composite", seed: int = 0, steps: int = 30, num_images: int = 1,
               size: tuple[int, int] = (512, 512)) -> Any:
        from compose import ComposeRequest

        request = ComposeRequest(  # checked here, before any model loads
            people=list(people or []), prompt=prompt, pose=pose,
            negative_prompt=negative_prompt or "", method=method, seed=_whole(seed, "seed"),
            steps=_whole(steps, "steps"), num_images=_whole(num_images, "images"), size=size, out=str(self.out),
        )
        with self._lock:
            return self.composer()(request)

    # -- scores --------------------------------------------------------------------------

    def runs(self) -> list[str]:
        if not self.out.is_dir():
            return []
        return sorted((str(d) for d in self.out.iterdir() if (d / "render.json").is_file()), reverse=True)

    def scorers(self) -> tuple[Any, Any]:
        from personas import load_face_backend

        if self._face_backend is None:
            self._face_backend = load_face_backend(self.settings.face_model)
        if self._clip is None and self._clip_error is None:
            from eval import ClipScorer

            try:
                self._clip = ClipScorer(self.settings.clip_model, self.settings.clip_pretrained,
                                        device=self.device or "cpu")
            except GroupshotError as e:  # shown beside every score: the faces still get scored
                self._clip_error = str(e)
        return self._face_backend, self._clip

    def score(self, run_dir: str | os.PathLike) -> "ScoreView":
        from eval import score_renders, write_report

        run_dir = Path(run_dir)
        with self._lock:
            face_backend, clip = self.scorers()
            scores = score_renders([run_dir], library=self.library, face_backend=face_backend, clip=clip)
            write_report(scores, run_dir / "report", title=f"groupshot demo: {run_dir.name}")
        return ScoreView.of(scores, clip_error=self._clip_error, report=run_dir / "report" / "report.html")


@dataclass
class ScoreView:
    """What the page shows of one scored render."""

    summary: str  # markdown: the course metrics with bands, the models used
    images: list[list[Any]]  # per image: file, faces, CLIP, faceless, missing, swaps
    faces: list[tuple[Any, str]]  # per (image, person): reference | face tile, caption

    @classmethod
    def of(cls, scores: Any, *, clip_error: str | None, report: Path) -> "ScoreView":
        m = scores.metrics
        titles = {"face_distance": "Face Distance", "clip_score": "CLIP Score", "faceless_images": "Faceless Images"}
        lines = ["| metric | value | band | points |", "|---|---|---|---|"]
        for x in m.course:
            value = "n/a" if x.value is None else (f"{x.value:.3f}" if isinstance(x.value, float) else str(x.value))
            points = "n/a" if x.points is None else f"{x.points}/{x.max_points}"
            lines.append(f"| {titles.get(x.name, x.name)} | {value} | {x.band or 'n/a'} | {points} |")
        fb = scores.face_backend
        clip = scores.clip
        models = f"faces: **{fb.get('name')}** ({fb.get('model')})"
        if clip:
            models += f"; CLIP: **{clip.get('model')}**" + (f" ({clip['pretrained']})" if clip.get("pretrained") else "")
        else:
            models += "; CLIP: not computed"
        c = m.counts
        notes = [models, f"missing people {c['missing_people']}, extra faces {c['extra_faces']}, "
                         f"identity swaps {c['identity_swaps']}; full report: `{report}`"]
        if clip_error:
            notes.append(f"CLIP score not computed: {clip_error}")
        summary = "\n".join(lines) + "\n\n" + "\n\n".join(notes)
        rows = [[Path(im.path).name, im.n_faces, "n/a" if im.clip_score is None else round(im.clip_score, 3),
                 "yes" if im.faceless else "no", ", ".join(im.missing) or "-", im.swaps] for im in scores.images]
        return cls(summary=summary, images=rows, faces=_face_tiles(scores))


def _face_tiles(scores: Any, tile: int = 128) -> list[tuple[Any, str]]:
    """Per (image, person): the person's reference crop beside the face assigned to them."""
    from PIL import Image, ImageDraw

    faces = {(f.image, f.index): f for f in scores.faces}
    images = {im.key: im for im in scores.images}
    out = []
    for p in scores.people:
        ref = scores.references[p.person]
        left = Image.open(ref.crop).convert("RGB").resize((tile, tile)) if ref.crop else Image.new("RGB", (tile, tile))
        canvas = Image.new("RGB", (2 * tile, tile), (40, 40, 40))
        canvas.paste(left, (0, 0))
        name = Path(images[p.image].path).name
        if p.face is None:
            ImageDraw.Draw(canvas).text((tile + 10, tile // 2 - 6), "no face", fill=(220, 220, 220))
            caption = f"{p.person} in {name}: no face found in their region"
        else:
            face = faces[(p.image, p.face)]
            with Image.open(images[p.image].path) as im:
                x0, y0, x1, y1 = face.box
                canvas.paste(im.convert("RGB").crop((x0, y0, x1, y1)).resize((tile, tile)), (tile, 0))
            verdict = "match" if p.match else "no match"
            caption = f"{p.person} in {name}: distance {p.distance:.3f} ({verdict}{', swapped' if p.swap else ''})"
        out.append((canvas, caption))
    return out


def _whole(value: Any, what: str) -> int:
    if value is None or isinstance(value, bool) or not float(value).is_integer():
        raise GroupshotError(f"{what} {value!r}: must be a whole number")
    return int(value)


# -- the page ---------------------------------------------------------------------------------


def build_page(demo: Demo) -> Any:
    """The gradio Blocks of the demo: people, compose, scores."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from compose import METHODS, list_templates

    s = demo.settings
    templates = [name for name, _, _ in list_templates()]

    def errors(fn):
        """User errors as gradio's error toast (one line), not a traceback."""
        @functools.wraps(fn)  # gradio reads the signature (the progress parameter) through __wrapped__
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (GroupshotError, FileNotFoundError) as e:
                raise gr.Error(" ".join(str(e).split())) from None
        return wrapped

    with gr.Blocks(title="groupshot", analytics_enabled=False) as page:
        gr.Markdown("# groupshot\nTrain people, put them in one photo, see every face scored. "
                    f"Base model `{demo.base_model}`; library `{demo.library.root}`.")
        with gr.Tabs():
            # -- people ----------------------------------------------------------------
            with gr.Tab("People", id="people"):
                with gr.Row():
                    with gr.Column(scale=3):
                        table = gr.Dataframe(headers=["name", "method", "prompt words", "photos", "trained"],
                                             value=demo.people_rows, interactive=False, elem_id="people-table")
                        select = gr.Dropdown(choices=demo.library.names(), label="person", elem_id="persona-select")
                        card = gr.Markdown(elem_id="persona-card")
                        with gr.Row():
                            loss = gr.Image(label="training loss", type="pil", interactive=False, elem_id="persona-loss")
                            refs = gr.Gallery(label="reference photos (eval compares faces with these)", columns=4,
                                              height=220, elem_id="persona-refs")
                    with gr.Column(scale=2):
                        gr.Markdown("### Train a person\n5-20 photos: different days, angles and light, one face each.")
                        name = gr.Textbox(label="name (letters, digits, _ or -)", elem_id="train-name")
                        class_word = gr.Textbox(label="class word", value=s.train.class_word, elem_id="train-class")
                        photos = gr.File(label=f"photos (JPEG, PNG, WebP; up to {s.max_photos}, {s.max_upload_mb:g} MB each)",
                                         file_count="multiple", file_types=list(PHOTO_SUFFIXES), elem_id="train-photos")
                        with gr.Accordion("settings", open=False):
                            method = gr.Radio(["pivotal", "lora", "ti"], value=s.train.method, label="method",
                                              elem_id="train-method")
                            lr = gr.Number(value=s.train.learning_rate, label="learning rate", elem_id="train-lr")
                            steps = gr.Number(value=s.train.max_train_steps, precision=0, label="steps",
                                              elem_id="train-steps")
                            resolution = gr.Number(value=s.train.resolution, precision=0, label="resolution (px)",
                                                   elem_id="train-resolution")
                        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                        status = gr.Markdown(elem_id="train-status")

            # -- compose ---------------------------------------------------------------
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    with gr.Column(scale=2):
                        people = gr.CheckboxGroup(choices=demo.library.names(), label="people (left to right)",
                                                  elem_id="compose-people")
                        pose = gr.Radio([*templates, UPLOADED_POSE], value="two_standing", label="pose",
                                        elem_id="compose-pose")
                        pose_file = gr.File(label="pose: skeleton image, OpenPose JSON or photo",
                                            file_types=list(POSE_SUFFIXES), elem_id="compose-pose-file")
                        preview = gr.Image(label="skeleton and regions", type="pil", interactive=False,
                                           elem_id="pose-preview")
                        preview_note = gr.Markdown(elem_id="pose-note")
                        prompt = gr.Textbox(label="prompt", value="two people at a beach bar, photo",
                                            elem_id="compose-prompt")
                        negative = gr.Textbox(label="negative prompt", elem_id="compose-negative")
                        with gr.Row():
                            c_method = gr.Radio(list(METHODS), value="composite", label="method", elem_id="compose-method")
                            seed = gr.Number(value=0, precision=0, label="seed", elem_id="compose-seed")
                        with gr.Row():
                            c_steps = gr.Number(value=s.render_steps, precision=0, label="steps", elem_id="compose-steps")
                            n_images = gr.Number(value=s.num_images, precision=0, label="images", elem_id="compose-images")
                            width = gr.Number(value=s.render_size[0], precision=0, label="width", elem_id="compose-width")
                            height = gr.Number(value=s.render_size[1], precision=0, label="height", elem_id="compose-height")
                        render_btn = gr.Button("Render", variant="primary", elem_id="compose-button")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="renders", columns=2, height=420, elem_id="compose-gallery")
                        c_status = gr.Markdown(elem_id="compose-status")
                        c_scores = gr.Markdown(elem_id="compose-scores")

            # -- scores ----------------------------------------------------------------
            with gr.Tab("Scores", id="scores"):
                with gr.Row():
                    run = gr.Dropdown(choices=demo.runs(), label="render", elem_id="score-run", scale=4)
                    score_btn = gr.Button("Score", elem_id="score-button", scale=1)
                summary = gr.Markdown(elem_id="score-summary")
                per_image = gr.Dataframe(headers=["image", "faces", "CLIP", "faceless", "missing", "swaps"],
                                         interactive=False, elem_id="score-images")
                face_gallery = gr.Gallery(label="each person: reference (left) and the face matched to them (right)",
                                          columns=3, height=360, elem_id="score-faces")

        # -- actions -------------------------------------------------------------------
        def refresh_people(selected=None):
            names = demo.library.names()
            return (demo.people_rows(), gr.update(choices=names, value=selected),
                    gr.update(choices=names))

        @errors
        def do_train(name_, class_word_, files, method_, lr_, steps_, resolution_, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc="checking photos")
            message = demo.train(name_, class_word_, files, method=method_, learning_rate=lr_, steps=steps_,
                                 resolution=resolution_)
            return (message, *refresh_people(name_.strip()))

        @errors
        def show_card(name_):
            return demo.card(name_)

        @errors
        def do_preview(people_, pose_, pose_file_, width_, height_):
            spec = demo.pose_spec(pose_, pose_file_)
            return demo.preview(people_ or [], spec, (_whole(width_, "width"), _whole(height_, "height")))

        @errors
        def do_render(people_, pose_, pose_file_, prompt_, negative_, method_, seed_, steps_, n_, width_, height_,
                      progress=gr.Progress(track_tqdm=True)):
            progress(0, desc="loading models (first render only)")
            spec = demo.pose_spec(pose_, pose_file_)
            result = demo.render(people_ or [], spec, prompt_, negative_prompt=negative_, method=method_, seed=seed_,
                                 steps=steps_, num_images=n_, size=(_whole(width_, "width"), _whole(height_, "height")))
            from PIL import Image

            images = [Image.open(p).convert("RGB") for p in result.images]
            message = f"rendered {len(images)} image(s) in {result.record['timing']['seconds_per_image']} s each: `{result.run_dir}`"
            return images, message, gr.update(choices=demo.runs(), value=str(result.run_dir))

        @errors
        def do_score(run_dir, progress=gr.Progress()):
            if not run_dir:
                return "Render something first, or pick a render.", [], [], ""
            progress(0, desc="scoring faces and prompts")
            view = demo.score(run_dir)
            return view.summary, view.images, view.faces, view.summary

        train_btn.click(do_train, [name, class_word, photos, method, lr, steps, resolution],
                        [status, table, select, people], concurrency_id="models", concurrency_limit=1)
        select.change(show_card, select, [card, loss, refs])
        for trigger in (people.change, pose.change, pose_file.change, width.change, height.change):
            trigger(do_preview, [people, pose, pose_file, width, height], [preview, preview_note], show_progress="hidden")
        render_btn.click(
            do_render, [people, pose, pose_file, prompt, negative, c_method, seed, c_steps, n_images, width, height],
            [gallery, c_status, run], concurrency_id="models", concurrency_limit=1,
        ).success(do_score, run, [summary, per_image, face_gallery, c_scores], concurrency_id="models")
        score_btn.click(do_score, run, [summary, per_image, face_gallery, c_scores], concurrency_id="models")
        page.load(refresh_people, None, [table, select, people])
    return page


def launch(demo: Demo, *, port: int = 7860, share: bool = False, host: str = "127.0.0.1", block: bool = True) -> Any:
    """Serve the demo on host:port (127.0.0.1: this machine only); `share` asks gradio for a
    public link, and only then does anything leave the machine."""
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise GroupshotError("compose --ui needs gradio: pip install 'groupshot[demo]'") from None

    page = build_page(demo)
    page.queue(default_concurrency_limit=1)
    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=False,
                max_file_size=f"{demo.settings.max_upload_mb:g}mb", allowed_paths=[], theme=theme, ssr_mode=False,
                show_error=True, footer_links=[])
    return page
