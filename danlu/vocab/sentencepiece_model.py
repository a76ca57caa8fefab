"""New pieces in a sentencepiece tokenizer.model, as the seed adds its Chinese vocabulary to LLaMA's."""
from __future__ import annotations

from pathlib import Path

from danlu.checkpoints.errors import CheckpointError

CONTROL_PIECE, USER_DEFINED_PIECE = 3, 4  # ModelProto.SentencePiece.Type


def read_model_proto(path: Path):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except DecodeError as e:
        raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
    return proto


def append_pieces(proto, pieces: list[str], added_tokens: dict[int, tuple[str, bool]]) -> None:
    """Append `pieces` to `proto` in place, after the tokens transformers added beyond the model's own pieces.

    added_tokens: id -> (text, special) of the tokenizer's added tokens; those past the last piece become
    pieces of their own first (CONTROL if special, USER_DEFINED if not), so that a piece's index, its id, is
    the same in tokenizer.model and tokenizer.json.

    Scores: sentencepiece's BPE joins the best-scored piece first, and transformers orders the merges of a
    converted model by piece id. The new pieces score below every old one, in the order given, so both put
    them after the old pieces, as the merges appended to tokenizer.json are. (The seed's recipe gives them
    score 0, which makes them win over the old pieces and ties them with one another.)
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    for token_id in sorted(i for i in added_tokens if i >= len(proto.pieces)):
        if token_id != len(proto.pieces):
            raise CheckpointError(f"tokenizer.model has {len(proto.pieces)} pieces but the tokenizer's added "
                                  f"tokens leave a gap before id {token_id}; the new pieces' ids could not match")
        text, special = added_tokens[token_id]
        proto.pieces.append(model_pb2.ModelProto.SentencePiece(
            piece=text, score=0.0, type=CONTROL_PIECE if special else USER_DEFINED_PIECE))
    lowest = min((p.score for p in proto.pieces), default=0.0)
    for rank, piece in enumerate(pieces, 1):
        proto.pieces.append(model_pb2.ModelProto.SentencePiece(piece=piece, score=lowest - rank))
