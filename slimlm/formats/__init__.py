"""The files slimlm writes beside (or instead of) a stock checkpoint and reads back: packed quantized codes,
the compressed-tensors export. The model loader uses them; they import no job."""
