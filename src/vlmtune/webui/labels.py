"""The page's labels in English and Chinese.

Gradio translates these keys in the browser and picks the language from the browser's
locale; the Settings link in the page footer switches it. Values computed on the server
(replies, status messages, logs) are not translated.
"""

from __future__ import annotations

LABELS: dict[str, tuple[str, str]] = {
    # key: (English, Chinese)
    "title": ("vlmtune: fine-tune and chat", "vlmtune：微调与对话"),
    "chat_tab": ("Chat", "对话"),
    "train_tab": ("Train", "训练"),
    "adapter": ("Adapter (empty: the base model alone)", "适配器（留空：只用基座模型）"),
    "refresh_adapters": ("Refresh list", "刷新列表"),
    "compare": ("Compare with the base model", "与基座模型对比"),
    "system_prompt": ("System prompt", "系统提示词"),
    "system_prompt_info": (
        "Empty: the adapter's trained system prompt, if it has one. Tick 'No system prompt' to send none.",
        "留空：使用适配器训练时的系统提示词（如有）。勾选“不用系统提示词”则不发送系统提示词。",
    ),
    "no_system_prompt": ("No system prompt", "不用系统提示词"),
    "generation_settings": ("Generation settings", "生成参数"),
    "temperature": ("Temperature (0: greedy decoding)", "温度（0：贪心解码）"),
    "top_p": ("Top-p (with temperature above 0)", "Top-p（温度大于 0 时生效）"),
    "max_new_tokens": ("Max new tokens per reply", "每条回复的最大新 token 数"),
    "reply_main": ("Reply", "回复"),
    "reply_adapter": ("With the adapter", "使用适配器"),
    "reply_base": ("Base model", "基座模型"),
    "message": ("Message (attach images with the clip button)", "消息（用回形针按钮附加图片）"),
    "message_placeholder": ("Type a message and press Enter", "输入消息后按回车"),
    "stop_reply": ("Stop", "停止"),
    "regenerate": ("Regenerate", "重新生成"),
    "undo": ("Undo last turn", "撤销上一轮"),
    "clear": ("Clear", "清空"),
    "dataset": (
        "Dataset file (path on the server, or modelscope:ID / huggingface:ID)",
        "数据集文件（服务器上的路径，或 modelscope:ID / huggingface:ID）",
    ),
    "upload_dataset": ("Or upload a dataset file", "或上传数据集文件"),
    "base_model": (
        "Base model (folder, or modelscope:ID / huggingface:ID; a plain id uses the preset's model.hub)",
        "基座模型（文件夹，或 modelscope:ID / huggingface:ID；不带前缀的 ID 使用预设的 model.hub）",
    ),
    "output_dir": ("Output folder", "输出文件夹"),
    "preset": ("Preset (all other settings)", "预设（其余所有设置）"),
    "epochs": ("Epochs", "训练轮数"),
    "learning_rate": ("Learning rate", "学习率"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "max_length": ("Max length (tokens per sample)", "最大长度（每个样本的 token 数）"),
    "thinking": ("Reply layout (thinking)", "回复格式（思考）"),
    "more_settings": ("More", "更多"),
    "max_steps": ("Max steps (-1: run all epochs)", "最大步数（-1：跑完所有轮）"),
    "overwrite": ("Replace an earlier run in this folder", "覆盖此文件夹中的旧运行"),
    "preview": ("Preview", "预览"),
    "start": ("Start", "开始"),
    "resume": ("Resume", "继续训练"),
    "stop": ("Stop", "停止"),
    "preview_sample": ("Encoded sample (green: supervised tokens)", "编码后的样本（绿色：参与训练的 token）"),
    "command": ("Command that repeats this run", "复现此次运行的命令"),
    "loss": ("Training loss", "训练损失"),
    "log": ("Log", "日志"),
    "progress": ("Progress", "进度"),
}


def translations() -> dict[str, dict[str, str]]:
    """Return the labels as gr.I18n keyword arguments: {"en": {...}, "zh": {...}}."""
    return {
        "en": {key: english for key, (english, _) in LABELS.items()},
        "zh": {key: chinese for key, (_, chinese) in LABELS.items()},
    }
