package batcher

// Config returns the configuration b runs with: the one given to New with
// its zero values replaced by the defaults (for tools that model the
// batcher, such as cmd/capsim).
func (b *Batcher) Config() Config { return b.cfg }
