"""The image-text-to-text families transformers ships, as data: what ``peftmed.backbones.hf.vlm`` needs to know
about each beyond what it finds in the module structure.

Per family (keyed by peftmed's backbone name):

- ``model_type``: transformers' name (the ``model_type`` of its ``config.json``);
- ``tiny``: the sub-configurations of a tiny random model for CPU tests (``text``, ``vision``, ``top``);
- ``tokens``: the special tokens its processor and model expect, as ``{tokenizer attribute: token}`` (a tiny
  model's tokenizer is trained with them; ``end`` is the token that ends an answer, ``eos`` the tokenizer's);
- ``ids``: config fields holding a token's id, ``{config field: key of tokens}``;
- ``image_processor``: (transformers class, keyword arguments, attributes) for the tiny model; a real folder's
  preprocessor_config.json fills the same class;
- ``processor``: keyword arguments of the family's processor for the tiny model;
- ``chat``: (user turn start, turn end, assistant turn start, image placeholder, starts with BOS) for the tiny
  model's chat template (a real folder brings its own), or None where the family has no chat format;
- ``prompt``: the prompt without a chat template (``{question}``);
- ``answer_values``: per-token inputs (besides ids and masks) and the value they take on answer tokens;
- ``presets``: real architectures by name: the configuration of the released checkpoint, with its parameter
  count (tests hold the built model to it) and its image-processor and processor settings;
- ``requires``: packages the family's processor needs (refused with their names when missing);
- ``head_multiple``: ``{"vision" or "text": n}`` where a part's head width must stay a multiple of n (not 2) in
  ``peftmed plan``'s narrow copies (Qwen's vision rotary turns each half of a head by one image axis).
"""

from __future__ import annotations

T = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=512)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QWEN_TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                   vision_end_token="<|vision_end|>", im_start="<|im_start|>", end="<|im_end|>")
QWEN_IDS = dict(image_token_id="image_token", video_token_id="video_token", vision_start_token_id="vision_start_token",
                vision_end_token_id="vision_end_token")
QWEN_CHAT = ("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|vision_start|><|image_pad|><|vision_end|>",
             False)
QWEN_IMAGES = ("Qwen2VLImageProcessorPil", dict(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32}, patch_size=4,
                                                merge_size=2, temporal_patch_size=2), {})
QWEN_REAL = dict(image_processor=dict(size={"shortest_edge": 448 * 448, "longest_edge": 448 * 448}, patch_size=14,
                                      merge_size=2, temporal_patch_size=2), processor={})
QWEN2_VL_2B = dict(
    text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
              tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
    top=dict(tie_word_embeddings=True), image_size=448, **QWEN_REAL)
QWEN25_VL_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    top={}, image_size=448, **QWEN_REAL)

FAMILIES: dict[str, dict] = {
    "qwen2-vl": dict(
        model_type="qwen2_vl", description="Qwen2-VL (MedVLM-R1): dynamic-resolution ViT | patch merger | Qwen2 LLM",
        tiny=dict(text=dict(T, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
                  vision=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4, patch_size=4,
                              spatial_merge_size=2, temporal_patch_size=2), top={}, image_size=32),
        tokens=QWEN_TOKENS, ids=QWEN_IDS, image_processor=QWEN_IMAGES, processor={}, chat=QWEN_CHAT,
        head_multiple={"vision": 4},
        presets={"qwen2-vl-2b": dict(QWEN2_VL_2B, params=2_208_985_600,
                                     description="Qwen2-VL-2B, MedVLM-R1's architecture")}),
    "qwen2.5-vl": dict(
        model_type="qwen2_5_vl", description="Qwen2.5-VL (Lingshu): windowed ViT | patch merger | Qwen2.5 LLM",
        tiny=dict(text=dict(T, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}),
                  vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                              patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                              fullatt_block_indexes=[1]), top={}, image_size=32),
        tokens=QWEN_TOKENS, ids=QWEN_IDS, image_processor=QWEN_IMAGES, processor={}, chat=QWEN_CHAT,
        head_multiple={"vision": 4},
        presets={"qwen2.5-vl-7b": dict(QWEN25_VL_7B, params=8_292_166_656,
                                       description="Qwen2.5-VL-7B, Lingshu-7B's architecture")}),
    "qwen3-vl": dict(
        model_type="qwen3_vl", description="Qwen3-VL: ViT with DeepStack mergers | patch merger | Qwen3 LLM",
        tiny=dict(text=dict(T, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                            "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
                  vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                              patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                              deepstack_visual_indexes=[0]), top={}, image_size=32),
        tokens=QWEN_TOKENS, ids=QWEN_IDS, image_processor=QWEN_IMAGES, processor={}, chat=QWEN_CHAT,
        head_multiple={"vision": 4}, presets={}),
    "gemma3": dict(
        model_type="gemma3", description="Gemma 3 (MedGemma): SigLIP | pooled projector | Gemma 3 LLM",
        tiny=dict(text=dict(T, head_dim=8, sliding_window=16), vision=dict(SIGLIP, vision_use_head=False),
                  top=dict(mm_tokens_per_image=4), image_size=32),
        tokens=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
                    turn="<start_of_turn>", end="<end_of_turn>"),
        ids=dict(boi_token_index="boi_token", eoi_token_index="eoi_token", image_token_index="image_token"),
        image_processor=("Gemma3ImageProcessorPil", dict(size={"height": 32, "width": 32}), {}),
        processor=dict(image_seq_length=4),
        chat=("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<start_of_image>", True),
        presets={"medgemma-4b": dict(
            text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                      query_pre_attn_scalar=256, max_position_embeddings=131072,
                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=896, patch_size=14, vision_use_head=False),
            top=dict(mm_tokens_per_image=256), image_size=896, params=4_300_079_472,
            image_processor=dict(size={"height": 896, "width": 896}), processor=dict(image_seq_length=256),
            description="MedGemma-4B: Gemma 3 4B with its SigLIP-400M tower")}),
    "internvl": dict(
        model_type="internvl", description="InternVL 3: InternViT | pixel-shuffle MLP projector | Qwen2.5 LLM",
        tiny=dict(text=dict(T), vision=dict(SIGLIP, image_size=[32, 32], patch_size=[8, 8]), top={}, image_size=32),
        tokens=dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                    video_token="<video>", im_start="<|im_start|>", end="<|im_end|>"),
        ids=dict(image_token_id="context_image_token"),
        image_processor=("GotOcr2ImageProcessorPil", dict(size={"height": 32, "width": 32}, crop_to_patches=False), {}),
        processor=dict(image_seq_length=4),
        chat=("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<IMG_CONTEXT>\n", False),
        presets={"internvl3-8b": dict(
            text=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=[448, 448], patch_size=[14, 14]),
            top=dict(downsample_ratio=0.5, tie_word_embeddings=False), image_size=448, params=7_944_300_032,
            image_processor=dict(size={"height": 448, "width": 448}, crop_to_patches=False),
            processor=dict(image_seq_length=256),
            description="InternVL3-8B: InternViT-300M + Qwen2.5-7B")}),
    "llava-next": dict(
        model_type="llava_next", description="LLaVA-NeXT (1.6): CLIP with any-resolution tiles | MLP | LLM",
        tiny=dict(text=dict(T), vision=dict(SIGLIP, model_type="clip_vision_model", projection_dim=32),
                  top=dict(image_grid_pinpoints=[[32, 32]]), image_size=32),
        tokens=dict(image_token="<image>"), ids=dict(image_token_index="image_token"),
        image_processor=("LlavaNextImageProcessorPil", dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                            image_grid_pinpoints=[[32, 32]]), {}),
        processor=dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1),
        chat=("USER: ", "\n", "ASSISTANT:", "<image>\n", True), answer_prefix=" ",
        presets={"llava-next-7b": dict(
            text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768,
                      rms_norm_eps=1e-5, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
            top=dict(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
            image_size=336, params=7_566_747_648, description="LLaVA-NeXT (1.6) Mistral-7B",
            image_processor=dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
            processor=dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1))}),
    "llava-onevision": dict(
        model_type="llava_onevision", description="LLaVA-OneVision: SigLIP with tiles | MLP | Qwen2 LLM",
        tiny=dict(text=dict(T, model_type="qwen2"), vision=dict(SIGLIP, model_type="siglip_vision_model"),
                  top=dict(image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1), image_size=32),
        tokens=dict(image_token="<image>", video_token="<video>", im_start="<|im_start|>", end="<|im_end|>"),
        ids=dict(image_token_index="image_token", video_token_index="video_token"),
        image_processor=("LlavaOnevisionImageProcessorPil", dict(size={"height": 32, "width": 32},
                                                                 image_grid_pinpoints=[[32, 32]]), {}),
        processor=dict(num_image_tokens=16, vision_feature_select_strategy="full"),
        chat=("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>\n", False), presets={}),
    "idefics3": dict(
        model_type="idefics3", description="Idefics3: SigLIP | pixel-shuffle connector | Llama 3 LLM",
        tiny=dict(text=dict(T), vision=dict(SIGLIP), top=dict(scale_factor=2), image_size=32),
        tokens=dict(image_token="<image>", fake_image_token="<fake_token_around_image>", global_image_token="<global-img>",
                    end="<end_of_utterance>"),
        ids=dict(image_token_id="image_token"),
        image_processor=("Idefics3ImageProcessorPil", dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                           do_image_splitting=False), {}),
        processor=dict(image_seq_len=4), chat=("User:", "<end_of_utterance>\n", "Assistant:", "<image>", True),
        answer_prefix=" ", presets={}),
    "paligemma": dict(
        model_type="paligemma", description="PaliGemma: SigLIP | linear | Gemma LLM (prefix-LM over image + prompt)",
        tiny=dict(text=dict(T, head_dim=8), vision=dict(SIGLIP, projection_dim=32), top=dict(projection_dim=32),
                  image_size=32),
        tokens=dict(image_token="<image>", end="</s>"), ids=dict(image_token_index="image_token"),
        image_processor=("SiglipImageProcessorPil", dict(size={"height": 32, "width": 32}), {"image_seq_length": 16}),
        processor={}, chat=None, prompt="<image>answer en {question}\n",
        answer_values={"token_type_ids": 1}, presets={}),
    "mllama": dict(
        model_type="mllama", description="Mllama (Llama 3.2 Vision): tiled ViT | linear | LLM with cross-attention layers",
        tiny=dict(text=dict(T, cross_attention_layers=[1]),
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                              attention_heads=4, image_size=32, patch_size=8, max_num_tiles=1,
                              supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0], vision_output_dim=64),
                  top={}, image_size=32),
        tokens=dict(image_token="<|image|>", python_token="<|python_tag|>", end="<|eot_id|>"),
        ids=dict(image_token_index="image_token"),
        image_processor=("MllamaImageProcessorPil", dict(size={"height": 32, "width": 32}, max_image_tiles=1), {}),
        processor={},
        chat=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "<|image|>", True), presets={}),
}

# SmolVLM is Idefics3's architecture and processor under other class names (its processor also needs num2words)
FAMILIES["smolvlm"] = dict(
    FAMILIES["idefics3"], model_type="smolvlm", description="SmolVLM: Idefics3's architecture, SmolLM2 LLM",
    image_processor=("SmolVLMImageProcessorPil",) + FAMILIES["idefics3"]["image_processor"][1:],
    processor=dict(FAMILIES["idefics3"]["processor"], video_processor=None), requires=("num2words",))

# where the parts of a transformers VLM live (attributes of its inner model), in the order tried
VISION_NAMES = ("visual", "vision_tower", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "connector")
MERGER_NAMES = ("merger", "deepstack_merger_list")  # a projector inside the vision tower (Qwen2/2.5/3-VL)
LLM_NAMES = ("language_model", "text_model")


def chat_template(user: str, end: str, assistant: str, image: str, bos: bool) -> str:
    """A minimal Jinja chat template in a family's format (for the tiny models; real folders bring theirs)."""
    return (("{{ bos_token }}" if bos else "") + "{% for m in messages %}{% if m['role'] == 'user' %}" + user
            + "{% else %}" + assistant + "{% endif %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
            + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}" + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + assistant + "{% endif %}")
