"""The Gradio web UI behind `vlmtune webui`: chat with a model and adapter, and start training runs.

The page only writes ordinary vlmtune config files and runs `vlmtune train` on them in a
subprocess, so every run it starts can be repeated from the command line.
"""
