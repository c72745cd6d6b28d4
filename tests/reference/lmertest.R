# lmerTest's Satterthwaite t-tests, for tests/test_satterthwaite.py.
# Regenerate from the repository root:
#   Rscript tests/reference/lmertest.R > tests/reference/lmertest_satterthwaite.json
suppressMessages({library(lmerTest); library(jsonlite)})
read <- function(name) read.csv(file.path("lmmjax/datasets", paste0(name, ".csv")))
cases <- list(
  sleep_reml = list(data = "sleepstudy", f = Reaction ~ Days + (Days | Subject), reml = TRUE),
  sleep_ml = list(data = "sleepstudy", f = Reaction ~ Days + (Days | Subject), reml = FALSE),
  sleep_quad = list(data = "sleepstudy", f = Reaction ~ Days + I(Days^2) + (1 | Subject),
                    reml = TRUE),
  penicillin = list(data = "Penicillin", f = diameter ~ 1 + (1 | plate) + (1 | sample),
                    reml = TRUE),
  pastes = list(data = "Pastes", f = strength ~ 1 + (1 | batch/cask), reml = TRUE)
)
out <- lapply(cases, function(cs) {
  m <- lmer(cs$f, read(cs$data), REML = cs$reml)
  tab <- coef(summary(m, ddf = "Satterthwaite"))
  list(data = cs$data, formula = paste(deparse(cs$f), collapse = ""), reml = cs$reml,
       names = rownames(tab), estimate = unname(tab[, "Estimate"]),
       se = unname(tab[, "Std. Error"]), df = unname(tab[, "df"]),
       p = unname(tab[, "Pr(>|t|)"]))
})
cat(toJSON(list(lmerTest = as.character(packageVersion("lmerTest")), cases = out),
           digits = NA, auto_unbox = TRUE, pretty = TRUE))
