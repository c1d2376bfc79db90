"""A structural stand-in for the remote code released with Qwen-VL (modeling_qwen.py, visual.py, configuration_qwen.py,
qwen_generation_utils.py, tokenization_qwen.py), written for the tests of `qwenvl.official.patch_official_model`.

Same class names, attribute names, forward signatures, cache layout and order of operations as the released files,
at tiny sizes; our own code. With transformers installed the classes are `transformers.PreTrainedModel`s and the
folder loads through `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (see `build.py`); without
it they are plain modules and everything but `generate`/`chat` still runs.
"""
