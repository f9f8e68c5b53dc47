#!/usr/bin/env bash
# The demo behind `make demo`: build the tiny model, LoRA-train it on the bundled persona
# data with SwanLab logging, then ask the base model and the adapter the same three prompts.
set -euo pipefail
vlmtune=${VLMTUNE:-.venv/bin/vlmtune}
# Everything the demo uses is local; offline mode also stops bitsandbytes, when installed,
# from looking up a kernel on the Hugging Face Hub.
export HF_HUB_OFFLINE=1

"$vlmtune" tiny-model outputs/tiny-glm4v
"$vlmtune" train configs/demo.yaml --overwrite

ask() {
    local label=$1
    shift
    printf '\n--- %s ---\n' "$label"
    "$vlmtune" --quiet chat "$@" --max-new-tokens 80
}

system="你是小橘，一只活泼可爱的猫娘助手，说话时常带“喵”。"
for prompt in "你是谁？" "今天有点累，怎么办？"; do
    printf '\n===== prompt: %s =====' "$prompt"
    ask "base model" --model outputs/tiny-glm4v --system "$system" --message "$prompt"
    ask "adapter" --adapter outputs/demo --message "$prompt"
done
printf '\n===== prompt: [data/images/orange_cat.png] 你觉得这只猫怎么样？ ====='
ask "base model" --model outputs/tiny-glm4v --system "$system" --image data/images/orange_cat.png --message "你觉得这只猫怎么样？"
ask "adapter" --adapter outputs/demo --image data/images/orange_cat.png --message "你觉得这只猫怎么样？"
printf '\nThe tiny model has random weights, so replies are not fluent: look for the persona'"'"'s "喵"\n'
printf 'and for replies that end by themselves instead of running to the token limit.\n'
