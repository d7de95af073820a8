module cptkit/ollamatmpl

go 1.22
