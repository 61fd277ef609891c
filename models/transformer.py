"""A small decoder-only transformer for causal language modelling (byte-level text by default)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from harness.errors import ConfigError


@keras.saving.register_keras_serializable(package="harness_models")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position (0 .. max_length - 1) to its input."""

    def __init__(self, max_length: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape) -> None:
        self.positions = self.add_weight(name="embeddings", shape=(self.max_length, input_shape[-1]),
                                         initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, inputs):
        length = keras.ops.shape(inputs)[1]
        return inputs + keras.ops.cast(self.positions[:length], inputs.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "max_length": self.max_length}


def build_transformer(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    num_layers: int = 2,
    d_model: int = 128,
    num_heads: int = 4,
    mlp_dim: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
) -> keras.Model:
    """Token ids (batch, length <= input_shape[0]) -> next-token logits (batch, length, num_outputs).

    Pre-norm blocks of causal multi-head self-attention and a GELU MLP, learned positions, dropout
    on the embeddings, attention weights and each residual branch. Inputs shorter than the
    training length work too (for sampling), longer ones do not.
    """
    if len(input_shape) != 1:
        raise ConfigError(f"model=transformer takes token windows (batch, seq_len) but the data has examples of "
                          f"shape {list(input_shape)}: expected token data such as data=text.")
    if d_model % num_heads:
        raise ConfigError(f"Config key 'model.d_model' = {d_model} is not divisible by model.num_heads = "
                          f"{num_heads}: expected a multiple.")
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(num_outputs, d_model, name="token_embedding",
                               embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))(tokens)
    x = PositionEmbedding(int(input_shape[0]), name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="embedding_dropout")(x)
    for index in range(num_layers):
        block_seed = seed + 10 * (index + 1)
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{index}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(num_heads, d_model // num_heads, dropout=dropout, seed=block_seed,
                                            name=f"block_{index}_attention")(h, h, use_causal_mask=True)
        x = x + keras.layers.Dropout(dropout, seed=block_seed + 1, name=f"block_{index}_attention_dropout")(h)
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block_{index}_mlp_norm")(x)
        h = keras.layers.Dense(mlp_dim, activation="gelu", name=f"block_{index}_mlp_in")(h)
        h = keras.layers.Dense(d_model, name=f"block_{index}_mlp_out")(h)
        x = x + keras.layers.Dropout(dropout, seed=block_seed + 2, name=f"block_{index}_mlp_dropout")(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(tokens, logits, name="transformer")
