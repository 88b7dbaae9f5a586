"""Global information extractors: S4, S4D, S5, Hyena and an LSTM, one file each."""
