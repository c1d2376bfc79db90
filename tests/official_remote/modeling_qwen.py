"""Stand-in for the released modeling_qwen.py of Qwen-VL: `QWenLMHeadModel` > `QWenModel` (with `visual` inside)
> `QWenBlock` > `QWenAttention`, `QWenMLP`, `RMSNorm`; `RotaryEmbedding` with dynamic NTK; log-n through
`logn_tensor`; a tuple cache of `[batch, seq, heads, head_dim]` keys and values, concatenated per step.

Images are found through `image_start_id` in input_ids and read from the paths between `<img>` and the first
`<imgpad>`; their features overwrite the span. Two masking revisions were released: the later one (the default)
adds a `[b, 1, t, s]` mask built by `_prepare_decoder_attention_mask`; the first one (`legacy_causal_mask`) masks
causally through `registered_causal_mask` and adds a `[b, 1, 1, s]` padding mask. Both are built here.

On transformers 5, whose PreTrainedModel no longer has `get_head_mask`, the stand-in carries that helper so that
the same forward runs; the released file fails there (`qwenvl.official` adds it to the instance it patches).
"""
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn import CrossEntropyLoss

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import StopWordsLogitsProcessor, decode_tokens, get_stop_words_ids, make_context
from .visual import VisionTransformer

try:
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.modeling_utils import PreTrainedModel
except ImportError:  # plain modules: forward, loss and cache work; generate and chat need transformers
    PreTrainedModel = None

    class _Output(dict):
        def __init__(self, **fields):
            super().__init__((k, v) for k, v in fields.items() if v is not None)
            self.__dict__.update(fields)

        def __getitem__(self, key):
            return self.to_tuple()[key] if isinstance(key, (int, slice)) else super().__getitem__(key)

        def to_tuple(self):
            return tuple(self.values())

    class BaseModelOutputWithPast(_Output):
        pass

    class CausalLMOutputWithPast(_Output):
        pass

_SENTINEL = object()


def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length=0):
    bsz, tgt_len = input_ids_shape
    mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
    cond = torch.arange(tgt_len, device=device)
    mask.masked_fill_(cond < (cond + 1).view(tgt_len, 1), 0)
    mask = mask.to(dtype)
    if past_key_values_length > 0:
        mask = torch.cat([torch.zeros(tgt_len, past_key_values_length, dtype=dtype, device=device), mask], dim=-1)
    return mask[None, None].expand(bsz, 1, tgt_len, tgt_len + past_key_values_length)


def _expand_mask(mask, dtype, tgt_len=None):
    bsz, src_len = mask.size()
    tgt_len = tgt_len if tgt_len is not None else src_len
    inverted = 1.0 - mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("masked_bias", torch.tensor(-1e4), persistent=False)
        self.seq_length = config.seq_length
        self.hidden_size = config.hidden_size
        self.split_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.scale_attn_weights = True
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = self.projection_size // config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(config.hidden_size, self.projection_size, bias=not config.no_bias)
        self.is_fp32 = not (config.bf16 or config.fp16)
        self.bf16 = config.bf16
        self.use_dynamic_ntk = config.use_dynamic_ntk
        self.use_logn_attn = config.use_logn_attn
        logn = [math.log(i, self.seq_length) if i > self.seq_length else 1 for i in range(1, 32768)]
        self.logn_tensor = torch.tensor(logn)[None, :, None, None]
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)

    def _attn(self, query, key, value, registered_causal_mask, attention_mask=None, head_mask=None):
        weights = torch.matmul(query, key.transpose(-1, -2))
        if self.scale_attn_weights:
            weights = weights / torch.full([], value.size(-1) ** 0.5, dtype=weights.dtype, device=weights.device)
        if registered_causal_mask is not None:  # the first revision
            q_len, k_len = query.size(-2), key.size(-2)
            causal = registered_causal_mask[:, :, k_len - q_len:k_len, :k_len]
            weights = torch.where(causal, weights, torch.finfo(weights.dtype).min)
            if attention_mask is not None:
                weights = weights + attention_mask
        else:  # the later revision: the causal part is inside attention_mask
            weights = weights + attention_mask
        weights = nn.functional.softmax(weights, dim=-1).type(value.dtype)
        weights = self.attn_dropout(weights)
        if head_mask is not None:
            weights = weights * head_mask
        return torch.matmul(weights, value).transpose(1, 2), weights

    def _split_heads(self, tensor, num_heads, attn_head_size):
        return tensor.view(tensor.size()[:-1] + (num_heads, attn_head_size))

    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.contiguous()
        return tensor.view(tensor.size()[:-2] + (num_heads * attn_head_size,))

    def forward(self, hidden_states, rotary_pos_emb=None, registered_causal_mask=None, layer_past=None,
                attention_mask=None, head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, use_cache=False):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        if rotary_pos_emb is not None:
            cur_len = query.shape[1]
            emb = [t[:, -cur_len:, :, :] for t in rotary_pos_emb]
            query = apply_rotary_pos_emb(query, emb)
            key = apply_rotary_pos_emb(key, emb)
        if layer_past is not None:
            key = torch.cat((layer_past[0], key), dim=1)
            value = torch.cat((layer_past[1], value), dim=1)
        present = (key, value) if use_cache else None
        if self.use_logn_attn and not self.training:
            if self.logn_tensor.device != query.device or self.logn_tensor.dtype != query.dtype:
                self.logn_tensor = self.logn_tensor.to(query.device).type_as(query)
            start, end = key.size(1) - query.size(1), key.size(1)
            query = query * self.logn_tensor[:, start:end, :, :].expand_as(query)
        query, key, value = query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)
        out, weights = self._attn(query, key, value, registered_causal_mask, attention_mask, head_mask)
        out = self.c_proj(self._merge_heads(out, self.num_heads, self.head_dim))
        outputs = (out, present)
        if output_attentions:
            outputs += (weights,)
        return outputs


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size // 2, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size // 2, bias=not config.no_bias)
        self.c_proj = nn.Linear(config.intermediate_size // 2, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states):
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.bf16 = config.bf16
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary_pos_emb=None, registered_causal_mask=None, layer_past=None,
                attention_mask=None, head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                use_cache=False, output_attentions=False):
        attn_outputs = self.attn(self.ln_1(hidden_states), rotary_pos_emb,
                                 registered_causal_mask=registered_causal_mask, layer_past=layer_past,
                                 attention_mask=attention_mask, head_mask=head_mask, use_cache=use_cache,
                                 output_attentions=output_attentions)
        outputs = attn_outputs[1:]
        layernorm_input = attn_outputs[0] + hidden_states
        hidden_states = layernorm_input + self.mlp(self.ln_2(layernorm_input))
        return (hidden_states,) + (outputs if use_cache else outputs[1:])


class QWenPreTrainedModel(PreTrainedModel if PreTrainedModel is not None else nn.Module):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]

    def __init__(self, config, *inputs, **kwargs):
        if PreTrainedModel is not None:
            super().__init__(config, *inputs, **kwargs)
        else:
            super().__init__()
            self.config = config

    if PreTrainedModel is None:
        def post_init(self):
            pass

        @property
        def device(self):
            return next(self.parameters()).device

        @property
        def dtype(self):
            return next(self.parameters()).dtype

    if PreTrainedModel is None or not hasattr(PreTrainedModel, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers):
            return [None] * num_hidden_layers if head_mask is None else head_mask

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class QWenModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = ["attn.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.num_hidden_layers = config.num_hidden_layers
        self.embed_dim = config.hidden_size
        self.gradient_checkpointing = False
        self.use_dynamic_ntk = config.use_dynamic_ntk
        self.seq_length = config.seq_length
        self.wte = nn.Embedding(self.vocab_size, self.embed_dim)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_ndims = None if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)
        dim = self.rotary_ndims if self.rotary_ndims is not None else config.kv_channels
        self.rotary_emb = RotaryEmbedding(dim, base=config.rotary_emb_base)
        self.use_flash_attn = config.use_flash_attn
        self.is_fp32 = not (config.bf16 or config.fp16)
        if config.legacy_causal_mask:
            n = config.max_position_embeddings
            causal = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
            self.register_buffer("registered_causal_mask", causal, persistent=False)
        else:
            self.registered_causal_mask = None
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _prepare_decoder_attention_mask(self, attention_mask, input_shape, inputs_embeds, past_key_values_length):
        combined = None
        if input_shape[-1] > 1:
            combined = _make_causal_mask(input_shape, inputs_embeds.dtype, inputs_embeds.device,
                                         past_key_values_length)
        if attention_mask is not None:
            expanded = _expand_mask(attention_mask, inputs_embeds.dtype, tgt_len=input_shape[-1])
            combined = expanded if combined is None else expanded + combined
        return combined

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        img_start = self.config.visual["image_start_id"]
        fake_images = images = None
        if past_key_values is None and torch.any(input_ids == img_start):
            bos_pos = torch.where(input_ids == img_start)
            eos_pos = torch.where(input_ids == img_start + 1)
            assert (bos_pos[0] == eos_pos[0]).all()
            img_pos = torch.stack((bos_pos[0], bos_pos[1], eos_pos[1]), dim=1)
            paths = []
            for i, a, b in img_pos:
                ids = input_ids[i][a + 1:b - 1].tolist()
                paths.append(bytes(ids[:ids.index(img_start + 2)]).decode("utf-8"))
            images = self.visual.encode(paths)
            assert images.shape[0] == len(paths)
        elif self.training:  # the ViT still runs (on a blank 224 image) so that every parameter gets a gradient
            fake_images = torch.zeros(1, 3, 224, 224).to(dtype=self.visual.conv1.weight.dtype,
                                                         device=self.visual.conv1.weight.device)
            images = self.visual(fake_images)

        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1])
        batch_size = input_ids.shape[0]
        if past_key_values is None:
            past_length = 0
            past_key_values = tuple([None] * len(self.h))
        else:
            past_length = past_key_values[0][0].size(-2)  # sic: the heads dim of [b, s, h, d], as released
        head_mask = self.get_head_mask(head_mask, self.config.num_hidden_layers)
        inputs_embeds = self.wte(input_ids)
        if self.registered_causal_mask is not None:
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch_size, -1)[:, None, None, :].to(dtype=self.dtype)
                attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min
        else:
            attention_mask = self._prepare_decoder_attention_mask(attention_mask, input_shape, inputs_embeds,
                                                                  past_length)
        hidden_states = inputs_embeds
        kv_seq_len = hidden_states.size()[1]
        if past_key_values[0] is not None:
            kv_seq_len += past_key_values[0][0].shape[1]
        if self.use_dynamic_ntk and kv_seq_len == hidden_states.size()[1] and not self.training:
            ntk_alpha = max(2 ** math.ceil(math.log(kv_seq_len / self.seq_length, 2) + 1) - 1, 1)
        else:
            ntk_alpha = self.rotary_emb._ntk_alpha_cached
        rotary_pos_emb = self.rotary_emb(kv_seq_len, ntk_alpha=ntk_alpha)
        for idx in range(len(rotary_pos_emb)):
            rotary_pos_emb[idx] = rotary_pos_emb[idx].to(hidden_states.device)
        hidden_states = self.drop(hidden_states).clone()
        if fake_images is not None:
            hidden_states = hidden_states + images.mean() * 0
        elif images is not None:
            for idx, (i, a, b) in enumerate(img_pos):
                hidden_states[i][a + 1:b] = images[idx]
        output_shape = input_shape + (hidden_states.size(-1),)

        presents = () if use_cache else None
        all_attentions = () if output_attentions else None
        all_hidden = () if output_hidden_states else None
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
            if self.gradient_checkpointing and self.training:
                def run(*inputs, block=block):
                    return block(*inputs, use_cache, output_attentions)

                outputs = torch.utils.checkpoint.checkpoint(
                    run, hidden_states, rotary_pos_emb, self.registered_causal_mask, None, attention_mask,
                    head_mask[i], encoder_hidden_states, encoder_attention_mask, use_reentrant=False)
            else:
                outputs = block(hidden_states, layer_past=layer_past, rotary_pos_emb=rotary_pos_emb,
                                registered_causal_mask=self.registered_causal_mask, attention_mask=attention_mask,
                                head_mask=head_mask[i], encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
                                output_attentions=output_attentions)
            hidden_states = outputs[0]
            if use_cache is True:
                presents = presents + (outputs[1],)
            if output_attentions:
                all_attentions = all_attentions + (outputs[2 if use_cache else 1],)
        hidden_states = self.ln_f(hidden_states).view(output_shape)
        if output_hidden_states:
            all_hidden = all_hidden + (hidden_states,)
        if not return_dict:
            return tuple(v for v in [hidden_states, presents, all_hidden] if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden, attentions=all_attentions)


class QWenLMHeadModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = [r"h\.\d+\.attn\.rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_unexpected = [r"h\.\d+\.attn\.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        assert config.bf16 + config.fp16 + config.fp32 <= 1, 'Only one of "bf16", "fp16", "fp32" can be true'
        if config.bf16 + config.fp16 + config.fp32 == 0:  # as released: bf16 where CUDA supports it
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                config.bf16 = True
            else:
                config.fp32 = True
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        if config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        token_type_ids = kwargs.get("token_type_ids", None)
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, -1].unsqueeze(-1)
        attention_mask = kwargs.get("attention_mask", None)
        position_ids = kwargs.get("position_ids", None)
        if attention_mask is not None and position_ids is None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            if past_key_values:
                position_ids = position_ids[:, -1].unsqueeze(-1)
        else:
            position_ids = None
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({"past_key_values": past_key_values, "use_cache": kwargs.get("use_cache"),
                             "position_ids": position_ids, "attention_mask": attention_mask,
                             "token_type_ids": token_type_ids})
        return model_inputs

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict)
        lm_logits = self.lm_head(transformer_outputs[0])
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                                      hidden_states=transformer_outputs.hidden_states,
                                      attentions=transformer_outputs.attentions)

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)

    def chat(self, tokenizer, query, history, system="You are a helpful assistant.", append_history=True,
             stream=_SENTINEL, stop_words_ids=None, generation_config=None, **kwargs):
        generation_config = generation_config if generation_config is not None else self.generation_config
        assert stream is _SENTINEL
        assert generation_config.chat_format == "chatml"
        history = [] if history is None else history
        stop_words_ids = [] if stop_words_ids is None else stop_words_ids
        max_window_size = kwargs.get("max_window_size", None) or generation_config.max_window_size
        raw_text, context_tokens = make_context(tokenizer, query, history=history, system=system,
                                                max_window_size=max_window_size,
                                                chat_format=generation_config.chat_format)
        stop_words_ids.extend(get_stop_words_ids(generation_config.chat_format, tokenizer))
        input_ids = torch.tensor([context_tokens]).to(self.device)
        outputs = self.generate(input_ids, stop_words_ids=stop_words_ids, return_dict_in_generate=False,
                                generation_config=generation_config, **kwargs)
        response = decode_tokens(outputs[0], tokenizer, raw_text_len=len(raw_text),
                                 context_length=len(context_tokens), chat_format=generation_config.chat_format,
                                 verbose=False, errors="replace")
        if append_history:
            history.append((query, response))
        return response, history

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None,
                 prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None, streamer=None, **kwargs):
        generation_config = generation_config if generation_config is not None else self.generation_config
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None and generation_config is not None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids is not None:
            processor = StopWordsLogitsProcessor(stop_words_ids=stop_words_ids,
                                                 eos_token_id=generation_config.eos_token_id)
            if logits_processor is None:
                logits_processor = LogitsProcessorList([processor])
            else:
                logits_processor.append(processor)
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer, **kwargs)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        self.dim = dim
        self.base = base
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self._rotary_pos_emb_cache = None
        self._seq_len_cached = 0
        self._ntk_alpha_cached = 1.0

    def update_rotary_pos_emb_cache(self, max_seq_len, offset=0, ntk_alpha=1.0):
        seqlen = max_seq_len + offset
        if seqlen > self._seq_len_cached or ntk_alpha != self._ntk_alpha_cached:
            base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, device=self.inv_freq.device).float()
                                            / self.dim))
            self._seq_len_cached = max(2 * seqlen, 16)
            self._ntk_alpha_cached = ntk_alpha
            seq = torch.arange(self._seq_len_cached, device=self.inv_freq.device)
            freqs = torch.outer(seq.type_as(self.inv_freq), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
            self._rotary_pos_emb_cache = [emb.cos(), emb.sin()]

    def forward(self, max_seq_len, offset=0, ntk_alpha=1.0):
        self.update_rotary_pos_emb_cache(max_seq_len, offset, ntk_alpha)
        cos, sin = self._rotary_pos_emb_cache
        return [cos[:, offset:offset + max_seq_len], sin[:, offset:offset + max_seq_len]]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t, freqs):
    cos, sin = freqs
    rot_dim = cos.shape[-1]
    t_, t_pass = t[..., :rot_dim].float(), t[..., rot_dim:].float()
    t_ = t_ * cos + _rotate_half(t_) * sin
    return torch.cat((t_, t_pass), dim=-1).type_as(t)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight
