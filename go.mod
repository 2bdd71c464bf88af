module github.com/portrait-proxy/portrait-proxy

go 1.26
