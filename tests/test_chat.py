"""model.chat / model.chat_stream: the released signatures and history window, and earlier turns' work reused (each
image through the vision tower once, only new tokens prefilled) with answers identical to a fresh computation."""
import pytest
import torch
from PIL import Image

from qwenvl import QwenVL, QwenVLConfig
from qwenvl.generation import chat, chat_stream, generate, until_stop
from qwenvl.processing import images_for
from qwenvl.prompts import DEFAULT_SYSTEM, chat_ids, turn_ids
from qwenvl.text import ntk_alpha
from qwenvl.tokenizer import IMAGE_SPECIALS, QwenVLTokenizer

GREEDY = dict(max_new_tokens=8, do_sample=False)


def tiny(**text):
    torch.manual_seed(0)
    return QwenVL(QwenVLConfig.from_name("tiny").replace(text=text or None), kernels="torch").eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def tok(model):
    v = model.config.vision
    return QwenVLTokenizer.byte_level(v.image_start_id, v.n_queries)


class Probe:
    """Counts what the model is asked to do: the tokens of each forward call (a turn's first call is its prefill),
    the images through the vision tower, and the last position's logits of each prefill."""

    def __init__(self, model):
        self.model = model
        self.calls, self.encoded, self.prefill_logits = [], 0, []
        forward, encode = model.forward, model.encode_images

        def counted_forward(input_ids, *args, **kwargs):
            out = forward(input_ids, *args, **kwargs)
            if kwargs.get("num_logits_to_keep") == 1:  # a prefill (decode steps keep every position: one)
                self.prefill_logits.append(out.logits[0, -1].detach().clone())
            self.calls.append(input_ids.shape[1])
            return out

        def counted_encode(pixel_values):
            self.encoded += pixel_values.shape[0]
            return encode(pixel_values)

        model.forward, model.encode_images = counted_forward, counted_encode

    def turn(self, fn, *args, **kwargs):
        """Run one turn; returns (its result, tokens prefilled, its prefill's last logits)."""
        self.calls.clear()
        self.prefill_logits.clear()
        result = fn(*args, **kwargs)
        return result, self.calls[0], self.prefill_logits[0]

    def close(self):
        del self.model.forward, self.model.encode_images


@pytest.fixture
def probe(model):
    model.clear_chat_cache()
    p = Probe(model)
    yield p
    p.close()
    model.clear_chat_cache()


@pytest.fixture
def pictures(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 40), (0, 90, 255)).save(tmp_path / "b.png")
    return tmp_path


def queries(tok):
    return [tok.from_list_format([{"image": "a.png"}, {"text": "What colour is this?"}]),
            tok.from_list_format([{"image": "b.png"}, {"text": "And this one?"}]),
            "Which of the two pictures is brighter?"]


def three_turns(model, tok, root, probe):
    """[(response, history, prefilled, logits)] of a 3-turn conversation run through the chat cache."""
    out, history = [], None
    for q in queries(tok):
        (response, history), n, logits = probe.turn(model.chat, tok, q, history, image_root=root, **GREEDY)
        out.append((response, history, n, logits))
    return out


def fresh(model, tok, query, history, root=None, **options):
    """The same turn with nothing kept from before."""
    model.clear_chat_cache()
    return model.chat(tok, query, history, image_root=root, **GREEDY, **options)


def test_each_image_encoded_once_and_only_new_tokens_prefilled(model, tok, pictures, probe):
    turns = three_turns(model, tok, pictures, probe)
    assert probe.encoded == 2  # each turn re-encoding every image of the conversation would be 1 + 2 + 2 = 5
    prompts = [len(chat_ids(tok, q, history=h)) for q, h in zip(queries(tok), [[], *[t[1] for t in turns[:2]]])]
    prefilled = [t[2] for t in turns]
    assert prefilled[0] == prompts[0]
    assert prefilled[1] <= prompts[1] - prompts[0]     # the answer, the new picture and query: not turn 1 again
    assert prefilled[2] * 4 < prompts[2]                 # a text-only turn after two pictures
    assert model._chat_cache.last_turn == {"images_encoded": 0, "prompt_tokens": prompts[2],
                                           "reused_tokens": prompts[2] - prefilled[2],
                                           "prefilled_tokens": prefilled[2]}


def test_answers_identical_to_fresh_runs(model, tok, pictures, probe):
    turns = three_turns(model, tok, pictures, probe)
    history = []
    for q, (response, new_history, _, logits) in zip(queries(tok), turns):
        (again, again_history), n, fresh_logits = probe.turn(fresh, model, tok, q, history, pictures)
        assert (again, again_history) == (response, new_history)
        assert n == len(chat_ids(tok, q, history=history))  # the fresh run prefilled everything
        torch.testing.assert_close(logits, fresh_logits, rtol=1e-4, atol=1e-5)
        history = new_history
    # and the plain pipeline (prompt ids, every image, generate) gives the same last answer
    q, past = queries(tok)[2], turns[1][1]
    ids = torch.tensor([chat_ids(tok, q, history=past)])
    out = generate(model, ids, pixel_values=images_for(ids, tok, model.config.vision.image_size, root=pictures),
                   eos_token_id=[tok.im_end_id, tok.im_start_id, tok.eod_id], vocab_size=tok.vocab_size, **GREEDY)
    stops = [tok.im_end_id, tok.im_start_id, tok.eod_id]
    assert tok.decode(until_stop(out[0, ids.shape[1]:].tolist(), stops)) == turns[2][0]


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_edited_and_branched_histories_reuse_only_the_common_prefix(model, tok, pictures, probe):
    turns = three_turns(model, tok, pictures, probe)
    q1, q2, q3 = queries(tok)
    cached = chat_ids(tok, q3, history=turns[1][1])
    cases = [
        ("edited answer", q3, [(q1, "It is red."), turns[1][1][1]]),
        ("branch after turn 1", "Describe it in one word.", turns[0][1]),
        ("edited question", q3, [(q1 + " Be brief.", turns[0][0]), turns[1][1][1]]),
    ]
    for what, query, history in cases:
        (response, new_history), n, logits = probe.turn(model.chat, tok, query, history, image_root=pictures,
                                                        **GREEDY)
        prompt = chat_ids(tok, query, history=history)
        # what the cache held: the previous case's prompt and answer, or turn 3's for the first case
        keep = common_prefix(cached, prompt)
        assert n == len(prompt) - keep, what
        assert (response, new_history) == fresh(model, tok, query, history, pictures), what
        cached = prompt  # the fresh run left this case in the cache


def test_prefix_ending_inside_an_image_span_backs_off_to_its_start(model, tok, pictures, probe):
    Image.new("RGB", (20, 20), (0, 200, 0)).save(pictures / "ab.png")
    first = tok.from_list_format([{"image": "a.png"}, {"text": "colour?"}])
    other = tok.from_list_format([{"image": "ab.png"}, {"text": "colour?"}])  # shares "<img>a" with the first
    probe.turn(model.chat, tok, first, None, image_root=pictures, **GREEDY)
    (response, _), n, _ = probe.turn(model.chat, tok, other, None, image_root=pictures, **GREEDY)
    prompt = chat_ids(tok, other)
    span_start = prompt.index(tok.img_start_id)
    assert common_prefix(chat_ids(tok, first), prompt) > span_start + 1  # the ids agree inside the span
    assert n == len(prompt) - span_start
    assert response == fresh(model, tok, other, None, pictures)[0]


def make_context(tok, query, history, system, max_window_size):
    """The released qwen_generation_utils.make_context (ChatML), transcribed: the system part first, then each
    past turn, newest first, prepended while system + it + the newer turns stay below max_window_size."""
    im_start, im_end, nl = [tok.im_start_id], [tok.im_end_id], tok.encode("\n")

    def tokenize_str(role, content):
        allowed = set(IMAGE_SPECIALS)
        return tok.encode(role, allowed_special=allowed) + nl + tok.encode(content, allowed_special=allowed)

    system_tokens = im_start + tokenize_str("system", system) + im_end
    context_tokens = []
    for turn_query, turn_response in reversed(history):
        query_tokens = im_start + tokenize_str("user", turn_query) + im_end
        response_tokens = im_start + tokenize_str("assistant", turn_response) + im_end
        next_context_tokens = nl + query_tokens + nl + response_tokens
        current_context_size = len(system_tokens) + len(next_context_tokens) + len(context_tokens)
        if current_context_size < max_window_size:
            context_tokens = next_context_tokens + context_tokens
        else:
            break
    context_tokens = system_tokens + context_tokens
    context_tokens += nl + im_start + tokenize_str("user", query) + im_end + nl + im_start
    return context_tokens + tok.encode("assistant") + nl


def test_window_rule_is_the_released_one(tok):
    history = [(f"Question {i}: {'why? ' * (i % 4)}", f"<ref>thing {i}</ref><box>(1,2),(3,{i})</box> " * (1 + i % 3))
               for i in range(12)]
    full = chat_ids(tok, "Last?", history=history)
    for window in [1, 40, 100, 150, 151, 152, 400, 777, 1000, len(full) - 1, len(full), 10_000]:
        for system in ["You are a helpful assistant.", "S"]:
            expected = make_context(tok, "Last?", history, system, window)
            assert chat_ids(tok, "Last?", history=history, system=system, max_window_size=window) == expected, window


def test_window_in_chat_keeps_the_newest_turns_and_equals_fresh(model, tok, probe):
    history = [(f"Tell me fact number {i}.", f"Fact {i} is that {'x' * (10 + i)}.") for i in range(20)]
    window = 300
    (response, new_history), n, _ = probe.turn(model.chat, tok, "And the next fact?", history, max_window_size=window,
                                               **GREEDY)
    windowed = chat_ids(tok, "And the next fact?", history=history, max_window_size=window)
    assert n == len(windowed) < len(chat_ids(tok, "And the next fact?", history=history))
    assert "fact number 19" in tok.decode(windowed) and "fact number 0." not in tok.decode(windowed)
    assert new_history == history + [("And the next fact?", response)]
    assert (response, new_history) == fresh(model, tok, "And the next fact?", history, max_window_size=window)
    # the window as the released code reads it: from generation_config (a dict or any object with the names)
    model.clear_chat_cache()
    config = {"chat_format": "chatml", "max_window_size": window, "max_new_tokens": 8, "do_sample": False}
    (same, _), n2, _ = probe.turn(model.chat, tok, "And the next fact?", history, generation_config=config)
    assert (same, n2) == (response, n)
    with pytest.raises(ValueError, match="ChatML"):
        model.chat(tok, "hi", None, generation_config={"chat_format": "raw"})


def test_window_sliding_past_a_turn_prefills_again_and_equals_fresh(model, tok, probe):
    window, history, prompts, reused = 130, [], [], []
    for i in range(4):
        query = f"{i}: a question, please answer."
        (response, new_history), n, _ = probe.turn(model.chat, tok, query, history, max_window_size=window, **GREEDY)
        prompts.append(chat_ids(tok, query, history=history, max_window_size=window))
        reused.append(len(prompts[-1]) - n)
        assert (response, new_history) == fresh(model, tok, query, history, max_window_size=window)
        history = new_history  # the fresh run left this turn in the cache, as the conversation would
    system_part = len([tok.im_start_id] + turn_ids(tok, "system", DEFAULT_SYSTEM) + [tok.im_end_id])
    assert reused[1] >= len(prompts[0])  # turn 1 kept whole
    for k in (2, 3):  # the window keeps one past turn: the oldest one left, and only the system part is the same
        assert chat_ids(tok, "?", history=history[:k], max_window_size=window) != chat_ids(tok, "?", history[:k])
        assert reused[k] == common_prefix(prompts[k - 1], prompts[k]) < system_part + 8


def test_reuse_only_where_the_rotary_base_is_the_same(tok):
    """Dynamic NTK rotates every key with the factor of the prompt's length, so a prompt that crosses into another
    factor is prefilled whole; within one factor (here 3, past seq_length 128) the cache is reused."""
    model = tiny(seq_length=128)
    probe = Probe(model)
    try:
        history, alphas, prefilled = [], [], []
        for query in ["Please say something about the weather today.", "And what about tomorrow then?", "Why?"]:
            (response, new_history), n, logits = probe.turn(model.chat, tok, query, history, **GREEDY)
            prompt = len(chat_ids(tok, query, history=history))
            alphas.append(ntk_alpha(prompt, 128))
            prefilled.append((n, prompt))
            (again, again_history), _, fresh_logits = probe.turn(fresh, model, tok, query, history)
            assert (again, again_history) == (response, new_history)
            torch.testing.assert_close(logits, fresh_logits, rtol=1e-4, atol=1e-5)
            model.chat(tok, query, history, **GREEDY)
            history = new_history
        assert alphas == [1, 3, 3]  # the test's premise: turn 2 crosses seq_length, turn 3 stays in its factor
        assert prefilled[1][0] == prefilled[1][1]  # another factor: everything prefilled again
        assert prefilled[2][0] < prefilled[2][1] // 2  # the same factor: reused
    finally:
        probe.close()


def test_an_image_edited_on_disk_is_encoded_again(model, tok, pictures, probe):
    q1 = queries(tok)[0]
    r1, history = model.chat(tok, q1, None, image_root=pictures, **GREEDY)
    probe.turn(model.chat, tok, "Sure?", history, image_root=pictures, **GREEDY)
    assert probe.encoded == 1
    (pictures / "a.png").write_bytes((pictures / "a.png").read_bytes())  # the same bytes again: nothing to redo
    _, n_same, _ = probe.turn(model.chat, tok, "Sure?", history, image_root=pictures, **GREEDY)
    assert probe.encoded == 1 and n_same == 1
    Image.new("RGB", (40, 30), (0, 255, 0)).save(pictures / "a.png")  # same path, other picture
    (response, _), n, _ = probe.turn(model.chat, tok, "Sure?", history, image_root=pictures, **GREEDY)
    prompt = chat_ids(tok, "Sure?", history=history)
    assert probe.encoded == 2
    assert n == len(prompt) - prompt.index(tok.img_start_id)  # from the image on
    assert response == fresh(model, tok, "Sure?", history, pictures)[0]


def test_image_tags_in_an_answer_are_text(model, tok, pictures, probe):
    """An answer that names an image, or leaves a tag open, is text in the next prompt: no file is opened, nothing
    fails, and the answer is the fresh one."""
    history = [("hello", "See <img>missing.png</img> and <img>a.png</img>, or <img>unclosed")]
    ids = chat_ids(tok, "Go on.", history=history)
    assert tok.img_start_id not in ids and tok.img_end_id not in ids
    (response, _), _, _ = probe.turn(model.chat, tok, "Go on.", history, image_root=pictures, **GREEDY)
    assert probe.encoded == 0
    assert response == fresh(model, tok, "Go on.", history, pictures)[0]
    # the model itself writes <img>: make its id win every step
    row = model.lm_head.weight[tok.img_start_id].detach().clone()
    with torch.no_grad():
        model.lm_head.weight[tok.img_start_id] += 100.0
    try:
        written, history = model.chat(tok, "Show me a picture.", None, **GREEDY)
        assert written.startswith("<img>")
        second, _ = model.chat(tok, "Another one.", history, **GREEDY)  # the released code fails here
        assert second == fresh(model, tok, "Another one.", history)[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight[tok.img_start_id] = row


def test_changed_weights_drop_the_cache(model, tok, probe):
    r1, history = model.chat(tok, "hello", None, **GREEDY)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # an in-place write, as an optimizer step makes
    (_, _), n, _ = probe.turn(model.chat, tok, "again", history, **GREEDY)
    assert n == len(chat_ids(tok, "again", history=history))


def test_stream_matches_chat_and_updates_the_cache_alike(model, tok, pictures, probe):
    expected = three_turns(model, tok, pictures, probe)
    model.clear_chat_cache()
    probe.encoded = 0
    history = []
    for q, (response, new_history, prefilled, _) in zip(queries(tok), expected):
        streamed, n, _ = probe.turn(lambda *a, **k: list(model.chat_stream(*a, **k)), tok, q, history,
                                    image_root=pictures, **GREEDY)
        assert streamed[-1] == response
        assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))
        assert n == prefilled == model._chat_cache.last_turn["prefilled_tokens"]
        history = history + [(q, response)]
        assert history == new_history
    assert probe.encoded == 2
    # the functions of qwenvl.generation are the same machinery
    model.clear_chat_cache()
    assert chat(model, tok, queries(tok)[0], image_root=pictures, **GREEDY) == expected[0][:2]
    assert list(chat_stream(model, tok, queries(tok)[1], expected[0][1], image_root=pictures, **GREEDY))[-1] == \
        expected[1][0]


def test_a_stream_stopped_early_leaves_a_usable_cache(model, tok, probe):
    stream = model.chat_stream(tok, "Tell me a story.", None, **GREEDY)
    partial = next(stream)
    stream.close()
    history = [("Tell me a story.", partial)]
    (response, _), n, _ = probe.turn(model.chat, tok, "Go on.", history, **GREEDY)
    assert n < len(chat_ids(tok, "Go on.", history=history)) // 2
    assert response == fresh(model, tok, "Go on.", history)[0]


def test_released_signature_options(model, tok):
    history = [("hi", "hello")]
    response, returned = model.chat(tok, "and?", history, append_history=False, **GREEDY)
    assert returned == history and returned is not history and history == [("hi", "hello")]
    with pytest.raises(TypeError, match="chat_stream"):
        model.chat(tok, "q", None, stream=True)
    with pytest.raises(ValueError, match="logits_processor"):
        list(model.chat_stream(tok, "q", None, logits_processor=[lambda ids, scores: scores]))
    with pytest.raises(ValueError, match="stop_words_ids"):
        model.chat(tok, "q", None, stop_words_ids=[["x"]])
    # stop_words_ids ends the answer after the first of those token sequences, which stays in it
    ids = torch.tensor([chat_ids(tok, "Count!")])
    ends = [tok.im_end_id, tok.im_start_id, tok.eod_id]
    out = generate(model, ids, eos_token_id=ends, vocab_size=tok.vocab_size, **GREEDY)
    answer = until_stop(out[0, ids.shape[1]:].tolist(), ends)
    assert len(answer) >= 4
    word = answer[2:4]
    cut = next(k for k in range(2, len(answer) + 1) if answer[k - 2:k] == word)
    model.clear_chat_cache()
    stopped, _ = model.chat(tok, "Count!", None, stop_words_ids=[word], **GREEDY)
    assert stopped == tok.decode(answer[:cut])
    # the Chat model's defaults from a generation_config object
    config = type("GenerationConfig", (), {"chat_format": "chatml", "max_new_tokens": 2, "do_sample": False})()
    short, _ = model.chat(tok, "Count!", None, generation_config=config)
    assert short == tok.decode(answer[:2])
