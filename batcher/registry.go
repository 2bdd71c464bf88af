package batcher

import "github.com/prometheus/client_golang/prometheus"

func prometheusRegistry() prometheus.Registerer { return prometheus.NewRegistry() }
