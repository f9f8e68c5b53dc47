"""The Gradio app behind `vlmtune webui`: a Chat tab and a Train tab in one page."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr

from vlmtune.errors import ConfigError
from vlmtune.webui.chat import ChatBackend
from vlmtune.webui.chat_tab import ChatTab
from vlmtune.webui.jobs import JobManager
from vlmtune.webui.labels import translations
from vlmtune.webui.train_tab import TrainTab

logger = logging.getLogger(__name__)


@dataclass
class WebUISettings:
    """Settings that `vlmtune webui` passes to the app."""

    model: str
    adapter: str | None = None
    outputs_dir: str = "outputs"
    presets_dir: str = "configs"
    hub: str = "auto"
    device: str = "auto"
    max_new_tokens: int = 512


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """Split `user:password` for Gradio's login page; the password may contain colons."""
    if value is None:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise ConfigError("--auth: expected USER:PASSWORD with both parts non-empty, for example --auth alice:s3cret")
    return user, password


def build_app(settings: WebUISettings, jobs: JobManager | None = None) -> tuple[gr.Blocks, gr.I18n, JobManager]:
    """Load the chat model and build the page; returns the app, its translations and its job manager."""
    i18n = gr.I18n(**translations())
    jobs = jobs or JobManager()
    backend = ChatBackend(settings.model, hub=settings.hub, device=settings.device)
    if settings.adapter:
        backend.use_adapter(settings.adapter)
    chat = ChatTab(backend, settings.outputs_dir, settings.adapter, settings.max_new_tokens, i18n)
    train = TrainTab(jobs, settings.model, settings.outputs_dir, settings.presets_dir, i18n)
    with gr.Blocks(title="vlmtune", analytics_enabled=False) as app:
        gr.Markdown(f"## {i18n('title')}")
        with gr.Tabs():
            with gr.Tab(i18n("chat_tab"), id="chat", elem_id="tab-chat"):
                chat.build()
            with gr.Tab(i18n("train_tab"), id="train", elem_id="tab-train"):
                train.build()
        # Reattach to the server's job (if any) as soon as a page opens, with the form that started it.
        app.load(train.job_view, None, [train.command, train.progress, train.loss_plot, train.log])
        app.load(train.restore_form, None, train.form_inputs())
    return app, i18n, jobs


def launch(settings: WebUISettings, host: str, port: int, auth: str | None, share: bool) -> None:
    """Build and serve the app until interrupted, then stop an active training run with a checkpoint."""
    credentials = parse_auth(auth)
    app, i18n, jobs = build_app(settings)
    if host not in ("127.0.0.1", "localhost", "::1") and credentials is None:
        logger.warning("serving on %s without --auth: anyone who reaches this address can chat and train", host)
    # Gradio's own start-up lines would point to its launch() arguments instead of our flags.
    address = f"[{host}]" if ":" in host else host
    logger.info("web UI on http://%s:%d (stop with Ctrl+C; --share publishes a public link)", address, port)
    try:
        app.queue().launch(
            server_name=host,
            server_port=port,
            auth=credentials,
            share=share,
            i18n=i18n,
            ssr_mode=False,
            footer_links=["settings"],
            quiet=not share,
        )
    finally:
        jobs.shutdown()
